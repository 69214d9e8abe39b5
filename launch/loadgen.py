"""Load generator for a KServe v2 server (run it as its own process, on 127.0.0.1).

  python -m launch.loadgen --url http://127.0.0.1:PORT --model lenet --mode open \
      --rate 200 --arrival poisson --duration 20 --slo_ms 10 --out load.json
  python -m launch.loadgen ... --mode open --rho 0.7 --capacity 400 --arrival gamma --cv 2
  python -m launch.loadgen ... --mode closed --concurrency 16 --duration 5   # capacity
  python -m launch.loadgen ... --mode sequential --requests 300            # batch-1 latency

Open loop: arrival times are drawn up front (Poisson: exponential gaps; bursty: Gamma
gaps with the given coefficient of variation, CV 2 by default) at `rate` requests/s (or
`rho` x `capacity`); a dispatcher releases request i at its scheduled time to a pool of
keep-alive connections, and **latency is measured from the scheduled arrival time**, so
a request that could not be sent on time (all connections busy, dispatcher late) is
charged for the wait and is never skipped. Closed loop: `concurrency` clients send
back to back (the capacity measurement). Sequential: one request at a time.

Requests carry `images_per_request` images: real MNIST-5k test digits from `--images`
(an .npz with `images` uint8 (n, 28, 28, 1) and `labels`), else seeded random pixels.

The JSON written to --out (and the last line on stdout) holds: counts by status code,
latency percentiles of the served (200) requests, `slo_attainment` (fraction of ALL
scheduled requests served within `slo_ms`; shed or failed ones count as misses),
`slo_attainment_admitted` (among served ones), `shed_fraction` (503s), throughput,
model versions seen, accuracy (with labels), and how late the dispatcher ran.
"""

from __future__ import annotations

import argparse
import http.client
import json
import queue
import socket
import sys
import threading
import time
import urllib.parse
from typing import Optional

import numpy as np

clock = time.perf_counter


def arrival_times(rate: float, duration: float, arrival: str, cv: float,
                  seed: int) -> np.ndarray:
  """Scheduled arrival offsets (s) in [0, duration) of a renewal process at `rate`/s.

  poisson: exponential gaps (CV 1); gamma: Gamma(shape 1/cv^2, scale cv^2/rate) gaps.
  """
  if rate <= 0 or duration <= 0:
    raise ValueError(f"rate and duration must be > 0, got {rate}, {duration}")
  rng = np.random.default_rng(seed)
  n = int(rate * duration * 1.5) + 100
  if arrival == "poisson":
    gaps = rng.exponential(1.0 / rate, n)
  elif arrival == "gamma":
    if cv <= 0:
      raise ValueError(f"cv must be > 0, got {cv}")
    k = 1.0 / cv ** 2
    gaps = rng.gamma(k, 1.0 / (rate * k), n)
  else:
    raise ValueError(f"unknown arrival process '{arrival}' (poisson or gamma)")
  t = np.cumsum(gaps)
  while t[-1] < duration:  # (practically never) extend
    t = np.concatenate([t, t[-1] + np.cumsum(rng.exponential(1.0 / rate, n))])
  return t[t < duration]


def request_bodies(images: np.ndarray, per_request: int, count: int) -> list[bytes]:
  """`count` KServe v2 JSON bodies of `per_request` images each (cycling over images)."""
  bodies = []
  n = len(images)
  for i in range(count):
    idx = [(i * per_request + j) % n for j in range(per_request)]
    x = images[idx].astype(np.float32)
    bodies.append(json.dumps({"inputs": [{
        "name": "images", "shape": list(x.shape), "datatype": "FP32",
        "data": x.ravel().tolist()}]}).encode())
  return bodies


class Client:
  """One keep-alive connection; `post` returns (status, parsed JSON or None)."""

  def __init__(self, host: str, port: int, timeout: float):
    self.host, self.port, self.timeout = host, port, timeout
    self.conn: Optional[http.client.HTTPConnection] = None

  def _connect(self):
    self.conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
    self.conn.connect()
    self.conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

  def post(self, path: str, body: bytes) -> tuple[int, Optional[dict]]:
    for attempt in (0, 1):
      try:
        if self.conn is None:
          self._connect()
        self.conn.request("POST", path, body, {"Content-Type": "application/json"})
        resp = self.conn.getresponse()
        data = resp.read()
        if resp.will_close:
          self.close()
        try:
          return resp.status, json.loads(data)
        except ValueError:
          return resp.status, None
      except (http.client.HTTPException, OSError):
        self.close()
        if attempt:
          return -1, None
    return -1, None

  def close(self):
    if self.conn is not None:
      self.conn.close()
      self.conn = None


class LoadGen:
  """Sends bodies to `url`'s model and records per-request outcomes."""

  def __init__(self, url: str, model: str, bodies: list[bytes],
               labels: Optional[list[list[int]]] = None, timeout: float = 30.0):
    u = urllib.parse.urlparse(url)
    if u.scheme != "http" or not u.hostname:
      raise ValueError(f"--url must be http://HOST:PORT, got {url!r}")
    self.host, self.port = u.hostname, u.port or 80
    self.path = f"/v2/models/{model}/infer"
    self.bodies, self.labels, self.timeout = bodies, labels, timeout

  def _record(self, rec: list, i: int, status: int, resp: Optional[dict]) -> None:
    rec[0] = status
    if status == 200 and resp is not None:
      rec[1] = int(resp.get("model_version", -1))
      if self.labels is not None:
        pred = resp["outputs"][1]["data"]
        want = self.labels[i % len(self.labels)]
        rec[2] = sum(int(a == b) for a, b in zip(pred, want))

  def open_loop(self, offsets: np.ndarray, connections: int) -> dict:
    n = len(offsets)
    recs = [[0, -1, 0] for _ in range(n)]          # status, version, correct
    done_at = np.full(n, np.nan)
    sent_at = np.full(n, np.nan)
    work: queue.SimpleQueue = queue.SimpleQueue()
    t0 = clock() + 0.1
    t0_unix = time.time() + (t0 - clock())

    def worker():
      c = Client(self.host, self.port, self.timeout)
      while True:
        i = work.get()
        if i is None:
          c.close()
          return
        sent_at[i] = clock()
        status, resp = c.post(self.path, self.bodies[i % len(self.bodies)])
        done_at[i] = clock()
        self._record(recs[i], i, status, resp)

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(connections)]
    for t in threads:
      t.start()
    for i, off in enumerate(offsets):
      delay = t0 + off - clock()
      if delay > 0:
        time.sleep(delay)
      work.put(i)
    for _ in threads:
      work.put(None)
    for t in threads:
      t.join(self.timeout + 30)
    latency = done_at - (t0 + offsets)
    late = sent_at - (t0 + offsets)
    return {"latency": latency, "recs": recs, "wall": np.nanmax(done_at) - t0,
            "window_unix": [t0_unix, t0_unix + float(offsets[-1])],  # arrivals
            "late_ms": {"p50": float(np.nanmedian(late) * 1e3),
                        "p99": float(np.nanpercentile(late, 99) * 1e3),
                        "max": float(np.nanmax(late) * 1e3)}}

  def closed_loop(self, concurrency: int, duration: float) -> dict:
    out: list[tuple[float, list]] = []
    lock = threading.Lock()
    stop_at = clock() + duration
    t0 = clock()

    def worker(k: int):
      c = Client(self.host, self.port, self.timeout)
      i = k
      while clock() < stop_at:
        s = clock()
        status, resp = c.post(self.path, self.bodies[i % len(self.bodies)])
        rec = [0, -1, 0]
        self._record(rec, i, status, resp)
        with lock:
          out.append((clock() - s, rec))
        i += concurrency
      c.close()

    threads = [threading.Thread(target=worker, args=(k,), daemon=True)
               for k in range(concurrency)]
    for t in threads:
      t.start()
    for t in threads:
      t.join(duration + self.timeout + 30)
    wall = clock() - t0
    return {"latency": np.array([x[0] for x in out]), "recs": [x[1] for x in out],
            "wall": wall}


def summarize(res: dict, *, slo_ms: Optional[float], images_per_request: int,
              labels: bool) -> dict:
  lat = np.asarray(res["latency"], float)
  status = np.array([r[0] for r in res["recs"]])
  ok = status == 200
  out = {"requests": int(len(status)),
         "codes": {str(c): int(np.sum(status == c)) for c in sorted(set(status.tolist()))},
         "shed_fraction": float(np.mean(status == 503)) if len(status) else 0.0,
         "wall_s": float(res["wall"]),
         "throughput_rps": float(np.sum(ok) / res["wall"]) if res["wall"] > 0 else 0.0}
  if np.any(ok):
    good = lat[ok] * 1e3
    out["latency_ms"] = {"p50": float(np.percentile(good, 50)),
                         "p90": float(np.percentile(good, 90)),
                         "p99": float(np.percentile(good, 99)),
                         "p999": float(np.percentile(good, 99.9)),
                         "max": float(good.max()), "mean": float(good.mean())}
    versions = [r[1] for r, k in zip(res["recs"], ok) if k]
    out["versions"] = {"min": int(min(versions)), "max": int(max(versions)),
                       "distinct": int(len(set(versions)))}
    if labels:
      out["accuracy"] = float(sum(r[2] for r, k in zip(res["recs"], ok) if k)
                              / (np.sum(ok) * images_per_request))
  if slo_ms:
    within = ok & (lat * 1e3 <= slo_ms)
    out["slo_ms"] = slo_ms
    out["slo_attainment"] = float(np.mean(within)) if len(status) else 0.0
    out["slo_attainment_admitted"] = float(np.sum(within) / max(np.sum(ok), 1))
  if "window_unix" in res:
    out["window_unix"] = res["window_unix"]
  if "late_ms" in res:
    out["dispatch_late_ms"] = res["late_ms"]
  return out


def load_images(path: Optional[str], seed: int) -> tuple[np.ndarray, Optional[np.ndarray]]:
  if path:
    with np.load(path) as z:
      return np.asarray(z["images"]), np.asarray(z["labels"])
  rng = np.random.default_rng(seed)
  return rng.integers(0, 256, (64, 28, 28, 1), dtype=np.uint8), None


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--url", required=True)
  p.add_argument("--model", default="lenet")
  p.add_argument("--mode", choices=("open", "closed", "sequential"), default="open")
  p.add_argument("--rate", type=float, help="open loop: requests/s")
  p.add_argument("--rho", type=float, help="open loop: load as a fraction of --capacity")
  p.add_argument("--capacity", type=float, help="requests/s at rho = 1")
  p.add_argument("--arrival", choices=("poisson", "gamma"), default="poisson")
  p.add_argument("--cv", type=float, default=2.0, help="gamma: coefficient of variation")
  p.add_argument("--duration", type=float, default=10.0, help="seconds (open, closed)")
  p.add_argument("--requests", type=int, default=200, help="sequential: requests")
  p.add_argument("--concurrency", type=int, default=16, help="closed: clients")
  p.add_argument("--connections", type=int, default=64, help="open: connection pool")
  p.add_argument("--images_per_request", type=int, default=1)
  p.add_argument("--images", help=".npz with images (n, 28, 28, 1) uint8 and labels")
  p.add_argument("--slo_ms", type=float)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--timeout", type=float, default=30.0)
  p.add_argument("--out")
  a = p.parse_args(argv)
  sys.setswitchinterval(0.0005)  # many client threads: keep GIL hand-overs short
  if a.mode == "open":
    if a.rate is None:
      if a.rho is None or a.capacity is None:
        p.error("open loop needs --rate, or --rho with --capacity")
      a.rate = a.rho * a.capacity
    if a.rate <= 0:
      p.error(f"the request rate must be > 0, got {a.rate}")
  if a.images_per_request < 1:
    p.error("--images_per_request must be >= 1")
  images, labels = load_images(a.images, a.seed)
  nb = min(len(images), 256)
  bodies = request_bodies(images, a.images_per_request, nb)
  label_lists = None
  if labels is not None:
    n = len(images)
    label_lists = [[int(labels[(i * a.images_per_request + j) % n])
                    for j in range(a.images_per_request)] for i in range(nb)]
  try:
    gen = LoadGen(a.url, a.model, bodies, label_lists, a.timeout)
  except ValueError as e:
    p.error(str(e))
  if a.mode == "open":
    offsets = arrival_times(a.rate, a.duration, a.arrival, a.cv, a.seed)
    res = gen.open_loop(offsets, a.connections)
  elif a.mode == "closed":
    res = gen.closed_loop(a.concurrency, a.duration)
  else:
    c = Client(gen.host, gen.port, a.timeout)
    lat, recs = [], []
    t0 = clock()
    for i in range(a.requests):
      s = clock()
      status, resp = c.post(gen.path, bodies[i % nb])
      lat.append(clock() - s)
      rec = [0, -1, 0]
      gen._record(rec, i, status, resp)
      recs.append(rec)
    c.close()
    res = {"latency": np.array(lat), "recs": recs, "wall": clock() - t0}
  out = summarize(res, slo_ms=a.slo_ms, images_per_request=a.images_per_request,
                  labels=labels is not None)
  out["args"] = vars(a)
  if a.mode == "open":
    out["offered_rps"] = a.rate
  text = json.dumps(out)
  if a.out:
    with open(a.out, "w") as f:
      f.write(text)
  print(text, flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
