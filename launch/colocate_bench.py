"""Co-location benchmark: inference only, training only, naive co-location, coltrain.

  python -m launch.colocate_bench [--quick] --out results/colocate/results.json

Configurations, all on this machine, all servers and load generators separate
processes on 127.0.0.1:
  (A) inference only      server S with its training paused
  (B) training only       server S training, no requests
  (C) naive co-location   S serving with its training paused + an independent training
                          process T (the same trainer, its own process) training at once
  (D) coltrain            S serving and training in its idle cycles (one scheduler)
S and T are `launch.serve` processes (`configs/serve.py`); configurations are switched
with the `/coltrain/training` pause/resume endpoint, so A, B, C and D share one
warmed-up server and are measured in turn at every load, in two mirrored halves (e.g.
A C D B | B D C A, the first order rotating with rho), so that every configuration's
measurement sits at the same mean time and a drift of the shared machine's speed
(+-15 % within minutes here) favours none of them.

Steps: (1) SLO = 5 x the median latency of isolated batch-1 requests (one at a time,
25/s, so each finds the server idle) to a fresh inference-only server (unless
--slo_ms); (2) capacity = the highest open-loop Poisson rate that (A) serves with >= 99 %
of all its requests (shed ones included) within the SLO, searched on a grid of ratio
1.15 (a rate passes when two of at most three probes pass) from the best goodput of a
closed loop at 1-16 clients (`search_capacity`; the closed loop alone is not the knee:
its latency is self-limited by the clients, and it sat above or below the knee
depending on the SLO); (3) B's training
samples/s; (4) for each rho in {0.1, 0.3, 0.5, 0.7, 0.9}: open-loop Poisson load at
rho x capacity on A, C and D and B's training alone, each in the two halves above
(a point summarizes both halves' requests together), then bursty Gamma CV 2 load on A
and D; each rho's retention is against the B of its own round;
(5) overload at rho = 1.5 on D and A (its table gives the admitted requests' SLO
attainment from the scheduled arrivals and, the server's view when the load generator
itself ran late, from the actual sends); (6) 1,000 malformed requests, then a health
check and a valid request. Training throughput is the servers' `coltrain_train_samples_total` rate
over the exact arrival window of each run (sampled 5 times a second); U (inference busy
fraction) is `coltrain_inference_busy_seconds_total`'s rate in A (the device time of
its batches), and U_device the busy fraction of A's device cores
(`coltrain_device_cpu_seconds_total`: everything the emulated device ran to serve,
batching, admission and XLA's dispatch included). Where the device's scheduler thread
spent its time (`coltrain_device_thread_seconds_total`: batches, their results,
receiving and admitting requests, deciding, training chunks, and each reason it held
training) is kept per point as `device_thread` (fractions of wall time) and tabulated
for A and D in results.md, beside D's chunk time against B's of the same round.

Requests carry the images as the protocol's binary tensor data (`--encoding json`:
as JSON numbers).

Cores: with --device_cpus (default: the last core) both servers run their device work
(XLA, schedulers) on the reserved cores and their front ends, the load generators and
the metrics poller on the others (`serve.device_cpus`, `coltrain.cpus`).

Priority (--generator_priority, default auto): a load generator stands in for clients on
other machines, which send on time whatever the server's load. On the host core it shares
with the front ends it does so only if it wins the core when a send is due; without that,
above ~8,000 req/s on a 2-core machine the generator fell behind by 0.2-0.6 s and its
lateness, not the server, decided the overload point. So the generators run 10 niceness
steps ahead of the servers: at the current niceness - 10 where this user may raise
priority (`loadgen --nice`), else with the servers started at + 10 instead. The choice
is in `conditions.priority`.

Writes --out (raw points, `summary`, conditions incl. load averages), a markdown table
(`results.md`, with where A's and D's slowest 1 % of requests spent their time) and a
plot (`colocate.png`) next to it.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from typing import Callable, Optional

import numpy as np

from coltrain.serve.metrics import THREAD_ACTIVITIES
from launch import loadgen

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RHOS = (0.1, 0.3, 0.5, 0.7, 0.9)
STANDALONE_RATE = 25.0   # req/s of the isolated batch-1 requests that set the SLO
OVERLOAD_RHO = 1.5
ROUND_ORDER = ("A", "C", "D", "B")   # a rho's round: this order, then mirrored
CAPACITY_ATTAINMENT = 0.99   # capacity: the highest rate served this much within the SLO
CAPACITY_STEP = 1.15         # ... searched on a geometric grid with this ratio
PRIORITY_STEPS = 10          # niceness steps the load generators run ahead of the servers


def log(msg: str) -> None:
  print(f"colocate_bench: {msg}", file=sys.stderr, flush=True)


# -- processes -------------------------------------------------------------------------
class ServeProcess:
  """A `launch.serve` subprocess run from checkout `repo` (default: this one); `stop()`
  terminates it (SIGKILL after a grace)."""

  def __init__(self, name: str, workdir: str, overrides: list[str], timeout: float = 300,
               repo: str = REPO, nice: Optional[int] = None):
    """`nice`: start it (and so its front end) at this niceness, at least this
    process's (None: inherit; through coreutils' `nice`, which execs the server: a
    `preexec_fn` is unsafe in a process with threads)."""
    self.name = name
    port_file = os.path.join(workdir, f"{name}.port")
    self.log_path = os.path.join(workdir, f"{name}.log")
    prefix = []
    if nice is not None:
      step = nice - os.getpriority(os.PRIO_PROCESS, 0)
      if step < 0:
        raise ValueError(f"a server can start at niceness {nice} only from a process at "
                         f"{nice} or below")
      prefix = ["nice", "-n", str(step)]
    self._log = open(self.log_path, "w")
    self.proc = subprocess.Popen(
        [*prefix, sys.executable, "-m", "launch.serve", "--config", "configs/serve.py",
         f"--port_file={port_file}", *overrides],
        cwd=repo, stdout=self._log, stderr=subprocess.STDOUT)
    self.port_file = port_file
    self.timeout = timeout
    self.url: Optional[str] = None

  def wait_ready(self) -> "ServeProcess":
    deadline = time.time() + self.timeout
    while not os.path.exists(self.port_file):
      if self.proc.poll() is not None:
        raise RuntimeError(f"server {self.name} exited ({self.proc.returncode}); see "
                           f"{self.log_path}:\n{open(self.log_path).read()[-3000:]}")
      if time.time() > deadline:
        raise TimeoutError(f"server {self.name} not ready after {self.timeout} s")
      time.sleep(0.2)
    self.url = f"http://127.0.0.1:{open(self.port_file).read().strip()}"
    return self

  def child_pids(self) -> list[int]:
    """The server's child processes (its HTTP front end), from every thread's
    `/proc/PID/task/TID/children` (Linux)."""
    pid, out = self.proc.pid, []
    for tid in os.listdir(f"/proc/{pid}/task"):
      try:
        with open(f"/proc/{pid}/task/{tid}/children") as f:
          out += [int(x) for x in f.read().split()]
      except FileNotFoundError:   # the thread ended meanwhile
        pass
    return out

  def get(self, path: str) -> bytes:
    with urllib.request.urlopen(self.url + path, timeout=30) as r:
      return r.read()

  def post(self, path: str, obj) -> dict:
    req = urllib.request.Request(self.url + path, data=json.dumps(obj).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
      return json.loads(r.read())

  def training(self, enabled: bool) -> None:
    self.post("/coltrain/training", {"enabled": enabled})

  def metrics(self) -> dict[str, float]:
    from coltrain.serve.metrics import parse_metrics
    return parse_metrics(self.get("/metrics").decode())

  def stop(self) -> None:
    if self.proc.poll() is None:
      self.proc.send_signal(signal.SIGTERM)
      try:
        self.proc.wait(20)
      except subprocess.TimeoutExpired:
        self.proc.kill()
        self.proc.wait(10)
    self._log.close()


def run_loadgen(url: str, args: list[str], timeout: float) -> dict:
  """Runs `launch.loadgen` as its own process; returns its JSON summary."""
  cmd = [sys.executable, "-m", "launch.loadgen", "--url", url, *args]
  try:
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout)
  except subprocess.TimeoutExpired as e:
    raise RuntimeError(f"loadgen timed out: {' '.join(cmd)}") from e
  if out.returncode != 0:
    raise RuntimeError(f"loadgen failed ({out.returncode}): {out.stderr[-2000:]}")
  return json.loads(out.stdout.strip().splitlines()[-1])


def may_raise_priority(steps: int = PRIORITY_STEPS) -> bool:
  """Whether a child of this process may run `steps` niceness steps below this one (root,
  CAP_SYS_NICE or RLIMIT_NICE), tried in a throwaway child."""
  code = ("import os; n = os.getpriority(os.PRIO_PROCESS, 0); "
          f"os.setpriority(os.PRIO_PROCESS, 0, max(n - {steps}, -20))")
  return subprocess.run([sys.executable, "-c", code], capture_output=True).returncode == 0


def generator_priority(mode: str, permitted: Callable[[], bool] = may_raise_priority
                       ) -> dict:
  """How the load generators get ahead of the servers on the host cores, for
  --generator_priority `mode`: {"mode": the one used, "loadgen_nice": niceness for
  `loadgen --nice` or None, "server_nice": niceness to start the servers at or None}.
  'loadgen': the generators at the current niceness - PRIORITY_STEPS (needs the
  privilege; ValueError otherwise); 'server': the servers at + PRIORITY_STEPS; 'auto':
  'loadgen' if `permitted()`, else 'server'; 'none': neither."""
  base = os.getpriority(os.PRIO_PROCESS, 0)
  if mode == "auto":
    mode = "loadgen" if permitted() else "server"
  elif mode == "loadgen":
    if not permitted():
      raise ValueError("--generator_priority loadgen: this user may not raise a process's "
                       "priority (needs root, CAP_SYS_NICE or RLIMIT_NICE); use 'server'")
  if mode == "loadgen":
    return {"mode": mode, "loadgen_nice": max(base - PRIORITY_STEPS, -20),
            "server_nice": None}
  if mode == "server":
    return {"mode": mode, "loadgen_nice": None,
            "server_nice": min(base + PRIORITY_STEPS, 19)}
  if mode == "none":
    return {"mode": mode, "loadgen_nice": None, "server_nice": None}
  raise ValueError(f"--generator_priority must be auto, loadgen, server or none, got "
                   f"{mode!r}")


def priority_args(priority: dict) -> list[str]:
  """The load generator's arguments for `generator_priority`'s choice."""
  n = priority["loadgen_nice"]
  return [] if n is None else ["--nice", str(n)]


THREAD_KEYS = {a: f'coltrain_device_thread_seconds_total{{activity="{a}",replica="0"}}'
               for a in THREAD_ACTIVITIES}


LATE_DROPS_KEY = 'coltrain_shed_total{reason="late"}'   # dropped at dispatch (drop_late)


class Poller:
  """Samples counters of several servers 5 times a second: (unix time, {key: value})."""
  KEYS = ("coltrain_train_samples_total", 'coltrain_inference_busy_seconds_total{replica="0"}',
          "coltrain_train_busy_seconds_total", "coltrain_train_steps_total",
          "coltrain_train_chunks_total", "coltrain_device_cpu_seconds_total",
          "coltrain_device_cpus", LATE_DROPS_KEY) + tuple(THREAD_KEYS.values())

  def __init__(self, servers: dict[str, ServeProcess], period: float = 0.2,
               cpus: Optional[frozenset] = None):
    self.servers, self.period, self.cpus = servers, period, cpus
    self.samples: list[tuple[float, dict]] = []
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._run, daemon=True)

  def _run(self):
    if self.cpus:   # this thread only (the servers started from this process keep theirs)
      os.sched_setaffinity(0, self.cpus)
    while not self._stop.is_set():
      row = {}
      for name, s in self.servers.items():
        try:
          m = s.metrics()
        except (OSError, urllib.error.URLError):
          continue
        for k in self.KEYS:
          row[f"{name}:{k}"] = m.get(k, 0.0)
      self.samples.append((time.time(), row))
      self._stop.wait(self.period)

  def start(self):
    self._thread.start()
    return self

  def stop(self):
    self._stop.set()
    self._thread.join(10)

  def rate(self, key: str, t0: float, t1: float) -> Optional[float]:
    """Rate of counter `key` (per second) between the samples nearest inside [t0, t1]."""
    inside = [(t, r[key]) for t, r in self.samples if t0 <= t <= t1 and key in r]
    if len(inside) < 2 or inside[-1][0] <= inside[0][0]:
      return None
    return (inside[-1][1] - inside[0][1]) / (inside[-1][0] - inside[0][0])


# -- the benchmark ---------------------------------------------------------------------
def write_images(path: str) -> None:
  from coltrain.data.mnist5k import load_arrays
  images, labels = load_arrays()["test"]
  np.savez(path, images=images, labels=labels)


def malformed_bodies(n: int, seed: int = 0) -> list[tuple[str, bytes]]:
  """n malformed inference requests (path, body) of many kinds."""
  rng = np.random.default_rng(seed)
  good = {"name": "images", "shape": [1, 28, 28, 1], "datatype": "FP32", "data": [0.0] * 784}

  def req(**t):
    return json.dumps({"inputs": [{**good, **t}]}).encode()

  kinds = [
      b"", b"{", b"not json", b"[]", b"null", b'{"inputs": 3}', b'{"inputs": []}',
      json.dumps({"inputs": [good, good]}).encode(), req(datatype="BYTES"),
      req(shape=[1, 28, 28]), req(shape=[0, 28, 28, 1]), req(shape=[1000, 28, 28, 1]),
      req(shape="1,28,28,1"), req(data=[0.0] * 783), req(data="abc"), req(data=[[0.0]] * 784),
      req(data=["x"] * 784), req(datatype="UINT8", data=[300] * 784),
      b'{"inputs": [{"name": "images", "shape": [1, 28, 28, 1], "datatype": "FP32", '
      b'"data": [NaN' + b", 0" * 783 + b"]}]}",
      json.dumps({"inputs": [good], "parameters": {"deadline_ms": -5}}).encode(),
      json.dumps({"inputs": [good], "id": 7}).encode(), b"\xff\xfe\x00garbage",
      b"[" * 100000,
  ]
  out = []
  for i in range(n):
    k = kinds[i % len(kinds)]
    if i % 7 == 6:  # random bytes too
      k = rng.integers(0, 256, int(rng.integers(1, 200)), dtype=np.uint8).tobytes()
    out.append(("/v2/models/lenet/infer", k))
  return out


def malformed_check(server: ServeProcess, n: int) -> dict:
  import http.client
  host, port = server.url[len("http://"):].split(":")
  codes: dict[str, int] = {}
  conn = http.client.HTTPConnection(host, int(port), timeout=30)
  for path, body in malformed_bodies(n):
    try:
      conn.request("POST", path, body, {"Content-Type": "application/json"})
      resp = conn.getresponse()
      resp.read()
      codes[str(resp.status)] = codes.get(str(resp.status), 0) + 1
      if resp.will_close:
        conn.close()
        conn = http.client.HTTPConnection(host, int(port), timeout=30)
    except (http.client.HTTPException, OSError) as e:
      codes[type(e).__name__] = codes.get(type(e).__name__, 0) + 1
      conn.close()
      conn = http.client.HTTPConnection(host, int(port), timeout=30)
  conn.close()
  ready = json.loads(server.get("/v2/health/ready"))["ready"]
  good = json.dumps({"inputs": [{"name": "images", "shape": [1, 28, 28, 1],
                                 "datatype": "FP32", "data": [0.0] * 784}]}).encode()
  req = urllib.request.Request(server.url + "/v2/models/lenet/infer", data=good)
  with urllib.request.urlopen(req, timeout=30) as r:
    valid_ok = r.status == 200 and "outputs" in json.loads(r.read())
  return {"requests": n, "codes": codes, "ready_after": ready, "valid_request_after": valid_ok,
          "server_alive": server.proc.poll() is None}


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--quick", action="store_true", help="short runs (under 10 minutes)")
  p.add_argument("--out", required=True, help="results.json path")
  p.add_argument("--slo_ms", type=float, help="SLO (default 5 x batch-1 median latency)")
  p.add_argument("--duration", type=float, help="seconds per load point")
  p.add_argument("--rhos", default=",".join(map(str, RHOS)))
  p.add_argument("--serve_override", action="append", default=[],
                 help="extra --config.KEY=VALUE for both servers (repeatable)")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--encoding", choices=("binary", "json"), default="binary",
                 help="how the load generators send the images: the protocol's binary "
                      "tensor data (default; the front end's CPU per request is 0.76x "
                      "JSON's, which matters on a host core shared with the load "
                      "generator) or JSON numbers")
  p.add_argument("--device_cpus", default="auto",
                 help="cores reserved for the emulated device in both servers "
                      "(serve.device_cpus); the load generators and the metrics poller "
                      "run on the others. 'auto': the last allowed core if there are >= 2, "
                      "'' for no split")
  p.add_argument("--generator_priority", default="auto",
                 choices=("auto", "loadgen", "server", "none"),
                 help="how the load generators run ahead of the servers on the host "
                      "cores: loadgen (them at niceness - 10; needs the privilege), "
                      "server (the servers at + 10), auto (loadgen if permitted, else "
                      "server), none")
  p.add_argument("--render_only", action="store_true",
                 help="measure nothing: recompute the summary, results.md and colocate.png "
                      "from the raw points of an existing --out results.json")
  a = p.parse_args(argv)
  if a.render_only:
    return render(a.out)
  rhos = [float(r) for r in a.rhos.split(",")]
  if any(r <= 0 for r in rhos):
    p.error("--rhos must be positive")
  duration = a.duration or (10.0 if a.quick else 30.0)
  out_dir = os.path.dirname(os.path.abspath(a.out))
  os.makedirs(out_dir, exist_ok=True)
  t_begin = time.time()
  work = tempfile.mkdtemp(prefix="colocate_")
  images = os.path.join(work, "mnist_test.npz")
  write_images(images)
  device_cpus, host_cpus = split_cpus(a.device_cpus)
  try:
    priority = generator_priority(a.generator_priority)
  except ValueError as e:
    p.error(str(e))
  log(f"generator priority: {priority}")
  if device_cpus:
    log(f"device cores {device_cpus}, host cores {sorted(host_cpus)} (front ends, load "
        f"generators, the metrics poller)")
  common = ["--config.serve.model_name=lenet", f"--config.serve.device_cpus={device_cpus}",
            *a.serve_override]
  lg_common = ["--model", "lenet", "--images", images]
  if a.encoding == "binary":
    lg_common.append("--binary")
  if device_cpus:
    lg_common += ["--cpus", ",".join(map(str, sorted(host_cpus)))]
  lg_common += priority_args(priority)
  procs: list[ServeProcess] = []
  loadavg: list[tuple[str, list[float]]] = []

  def note_load(tag: str):
    loadavg.append((tag, [round(x, 2) for x in os.getloadavg()]))

  results: dict = {"conditions": {}, "points": []}
  try:
    # (1) SLO
    slo_ms = a.slo_ms
    if slo_ms is None:
      probe = ServeProcess("probe", work, common + ["--config.serve.train=False",
                                                    "--config.serve.slo_ms=10000"],
                           nice=priority["server_nice"])
      procs.append(probe)
      probe.wait_ready()
      # Isolated batch-1 requests: a sparse open loop on one connection (mean gap 40 ms,
      # far above the latency), so each request finds the server idle, as "standalone"
      # means. Back-to-back requests (closed loop, one client) would keep the server's
      # threads and cores awake between requests, which no request sees under open-loop
      # load: that median is ~2x lower and the SLO from it would sit below the stack's
      # own tail at any load.
      seq = run_loadgen(probe.url, lg_common + [
          "--mode", "open", "--rate", str(STANDALONE_RATE), "--connections", "1",
          "--duration", str(8 if a.quick else 16), "--seed", str(a.seed)], 120)
      probe.stop()
      slo_ms = 5.0 * seq["latency_ms"]["p50"]
      results["batch1"] = seq
      log(f"batch-1 median {seq['latency_ms']['p50']:.3f} ms -> SLO {slo_ms:.2f} ms")
    results["slo_ms"] = slo_ms
    srv = [f"--config.serve.slo_ms={slo_ms}"] + common
    S = ServeProcess("S", work, srv, nice=priority["server_nice"])
    procs.append(S)
    S.wait_ready()   # one at a time: start-up timings are measured
    S.training(False)
    T = ServeProcess("T", work, srv, nice=priority["server_nice"])
    procs.append(T)
    T.wait_ready()
    S.training(False)
    T.training(False)
    poll = Poller({"S": S, "T": T}, cpus=host_cpus if device_cpus else None).start()
    note_load("start")

    # (2) capacity on A
    cap = []
    for c in (1, 2, 4, 8, 16):
      r = run_loadgen(S.url, lg_common + ["--mode", "closed", "--concurrency", str(c),
                                          "--duration", str(3 if a.quick else 6),
                                          "--slo_ms", str(slo_ms)], 120)
      good = r["throughput_rps"] * r.get("slo_attainment_admitted", 0.0)
      cap.append({"concurrency": c, "throughput_rps": r["throughput_rps"], "goodput_rps": good,
                  "latency_ms": r.get("latency_ms"), "codes": r["codes"]})
      log(f"closed loop x{c}: {r['throughput_rps']:.0f} req/s, goodput {good:.0f}")
    closed_best = max(x["goodput_rps"] for x in cap)

    probe_seeds = itertools.count(a.seed)   # every probe, a retry too, draws new arrivals

    def probe(rate: float) -> dict:
      r = run_loadgen(S.url, lg_common + [
          "--mode", "open", "--rate", str(rate), "--duration", str(3 if a.quick else 5),
          "--slo_ms", str(slo_ms), "--seed", str(next(probe_seeds))], 120)
      late = generator_late_p99(r)
      log(f"open loop {rate:.0f} req/s: SLO att {r.get('slo_attainment', 0):.4f}, shed "
          f"{r['shed_fraction']:.3f}, generator late p99 "
          f"{float('nan') if late is None else late:.2f} ms")
      return {"slo_attainment": r.get("slo_attainment", 0.0),
              "shed_fraction": r["shed_fraction"], "throughput_rps": r["throughput_rps"],
              "generator_late_p99_ms": late}

    capacity, probes = search_capacity(probe, closed_best)
    results["capacity"] = {"rps": capacity, "closed_loop": cap, "closed_loop_best_rps": closed_best,
                           "open_loop_probes": probes,
                           "criterion": f"SLO attainment >= {CAPACITY_ATTAINMENT}"}
    log(f"capacity {capacity:.0f} req/s (closed-loop best {closed_best:.0f})")

    # (3) B: training only (measured again in every round; each round uses its own)
    def measure_b(tag: str, seconds: float = duration,
                  chunks: Optional[list] = None) -> float:
      """B's training samples/s over `seconds`; its mean chunk time (ms), if measured,
      is appended to `chunks`."""
      sps, chunk = training_window(S, poll, seconds)
      if chunk is not None and chunks is not None:
        chunks.append(chunk)
      note_load(f"B {tag}")
      log(f"B ({tag}): {sps:.0f} training samples/s")
      time.sleep(0.5)
      return sps

    b_runs = [{"tag": "before", "train_samples_per_s": measure_b("before")}]

    def point(cfg: str, rho: float, arrival: str, seconds: float = duration,
              seed: int = a.seed, raw_out: Optional[str] = None) -> dict:
      r, metrics = load_window(S, poll, cfg, lg_common + [
          "--mode", "open", "--rate", str(rho * capacity), "--arrival", arrival,
          "--duration", str(seconds), "--slo_ms", str(slo_ms), "--seed", str(seed)] + (
          ["--raw_out", raw_out] if raw_out else []), seconds, trainer=T)
      rec = {"config": cfg, "rho": rho, "arrival": arrival, "rate_rps": rho * capacity,
             "loadavg_1m": round(os.getloadavg()[0], 2), **r}
      rec.update(metrics)
      rec.pop("args", None)
      lat = r.get("latency_ms", {})
      log(f"{cfg} rho={rho} {arrival}: p50 {lat.get('p50', float('nan')):.2f} p99 "
          f"{lat.get('p99', float('nan')):.2f} ms, SLO att {r.get('slo_attainment', 0):.4f}, "
          f"shed {r['shed_fraction']:.3f}, train {rec['train_samples_per_s'] or 0:.0f}/s, "
          f"U {rec['inference_busy_fraction'] or 0:.3f}, load {rec['loadavg_1m']}")
      return rec

    # (4) the load sweep. Each rho's Poisson round measures A, B, C and D in two halves
    # of `duration` / 2, in mirrored order (e.g. A C D B | B D C A, the first order
    # rotating with rho), so every configuration's halves sit at the same mean time:
    # a drift of the shared VM's speed during the round (+-15 % within minutes) biases
    # none of them against another. A point is its halves' requests summarized together.
    half = duration / 2
    for i, rho in enumerate(rhos):
      order = ROUND_ORDER[i % 4:] + ROUND_ORDER[:i % 4]
      halves: dict[str, list] = {cfg: [] for cfg in order}
      b_chunks: list[float] = []
      for k, cfg in enumerate(order + order[::-1]):
        if cfg == "B":
          halves["B"].append(measure_b(f"rho={rho} half {len(halves['B']) + 1}", half,
                                       b_chunks))
          continue
        raw = os.path.join(work, f"{cfg}_{rho}_{k}.npz")
        rec = point(cfg, rho, "poisson", half, a.seed + k, raw)
        halves[cfg].append((rec, loadgen.load_raw(raw)))
      for cfg in ("A", "C", "D"):
        results["points"].append(merge_halves(halves[cfg], slo_ms))
      b_runs.append({"tag": f"rho={rho}", "rho": rho, "halves": halves["B"],
                     "train_samples_per_s": float(np.mean(halves["B"])),
                     "chunk_ms": float(np.mean(b_chunks)) if b_chunks else None})
      if not a.quick or rho == 0.5:
        for cfg in ("A", "D") if i % 2 == 0 else ("D", "A"):
          results["points"].append(point(cfg, rho, "gamma"))
      note_load(f"rho={rho}")

    results["B"] = {"train_samples_per_s": float(np.mean([r["train_samples_per_s"]
                                                          for r in b_runs])),
                    "runs": b_runs, "window_s": duration}
    # (5) overload
    results["overload"] = [point("D", OVERLOAD_RHO, "poisson"),
                           point("A", OVERLOAD_RHO, "poisson")]
    # (6) malformed requests
    results["malformed"] = malformed_check(S, 1000)
    log(f"malformed: {results['malformed']}")
    results["training_status"] = {"S": json.loads(S.get("/coltrain/training")),
                                  "T": json.loads(T.get("/coltrain/training"))}
    poll.stop()
  finally:
    for pr in procs:
      pr.stop()

  results["summary"] = summarize(results)
  results["conditions"] = {
      "quick": a.quick, "duration_s": duration, "rhos": rhos, "cpus": os.cpu_count(),
      "loadavg": loadavg, "wall_s": round(time.time() - t_begin, 1),
      "serve_overrides": common, "device_cpus": device_cpus, "encoding": a.encoding,
      "host_cpus": sorted(host_cpus), "priority": priority,
      "note": "CPU-only machine: the servers' device work (XLA, schedulers) runs on the "
              "device cores, their HTTP front ends and the load generator on the host "
              "cores"}
  write_outputs(results, a.out)
  log(f"wrote {a.out} in {time.time() - t_begin:.0f} s")
  return 0


def generator_late_p99(run: dict) -> Optional[float]:
  """How late the load generator sent (p99, ms) in a loadgen summary; None if absent."""
  return (run.get("dispatch_late_ms") or {}).get("p99")


def search_capacity(probe: Callable[[float], dict], start_rps: float, *,
                    step: float = CAPACITY_STEP, max_probes: int = 20) -> tuple[float, list[dict]]:
  """The highest open-loop Poisson rate (requests/s) on a geometric grid that the server
  serves with at least CAPACITY_ATTAINMENT of all its requests (shed ones count as
  misses) within the SLO. `probe(rate)` runs one load and returns a dict with
  `slo_attainment`. A rate passes when two of at most three probes (each with new
  arrivals) pass: one stall of the shared machine decides nothing, and a rate whose
  probes pass half the time passes half the time (accepting the first pass of a probe
  and one retry accepted such a rate three times in four, and put capacity above the
  knee). The grid starts at `start_rps` (e.g. the closed loop's best goodput) and
  climbs by `step` until a rate fails; if `start_rps` itself fails, it descends until
  a rate passes. A rate still undecided when `max_probes` run out does not pass.
  Returns (capacity, probes in order)."""
  if start_rps <= 0:
    raise ValueError(f"start_rps must be positive, got {start_rps}")
  probes: list[dict] = []

  def passes(rate: float) -> bool:
    votes = []
    while len(probes) < max_probes:
      rec = probe(rate)
      rec = {**rec, "rate_rps": rate, "passed": rec["slo_attainment"] >= CAPACITY_ATTAINMENT}
      probes.append(rec)
      votes.append(rec["passed"])
      if votes.count(rec["passed"]) == 2:
        return rec["passed"]
    return False   # out of probes before two agreed: not shown to pass

  rate = start_rps
  if passes(rate):
    while len(probes) < max_probes and passes(rate * step):
      rate *= step
    return rate, probes
  while len(probes) < max_probes:
    rate /= step
    if passes(rate):
      return rate, probes
  raise RuntimeError(f"no rate down to {rate:.0f} req/s met the SLO for "
                     f"{CAPACITY_ATTAINMENT:.0%} of requests: {probes}")


def write_outputs(results: dict, out: str) -> None:
  """`out` (results.json) and, beside it, results.md and colocate.png."""
  out_dir = os.path.dirname(os.path.abspath(out))
  with open(out, "w") as f:
    json.dump(results, f, indent=1)
  write_table(results, os.path.join(out_dir, "results.md"))
  plot(results, os.path.join(out_dir, "colocate.png"))


def render(out: str) -> int:
  """`--render_only`: the summary, table and plot of `out`'s raw points, recomputed with
  this version's definitions (the raw points are kept as they are)."""
  try:
    with open(out) as f:
      results = json.load(f)
  except (OSError, ValueError) as e:
    raise SystemExit(f"colocate_bench: cannot read {out}: {e}")
  if not isinstance(results, dict) or "points" not in results:
    raise SystemExit(f"colocate_bench: {out} has no raw 'points' to render")
  results["summary"] = summarize(results)
  write_outputs(results, out)
  log(f"rendered {out} from {len(results['points'])} points")
  return 0


def training_window(server: ServeProcess, poll: Poller, seconds: float
                    ) -> tuple[Optional[float], Optional[float]]:
  """B, training only: turns `server`'s training on, lets it settle for 1 s, measures
  `seconds`, turns it off. Returns (training samples/s, mean chunk ms) over the window
  (`poll` samples the server under its `name`)."""
  server.training(True)
  time.sleep(1.0)
  t0 = time.time()
  time.sleep(seconds)
  t1 = time.time()
  server.training(False)
  return (poll.rate(f"{server.name}:coltrain_train_samples_total", t0, t1),
          chunk_ms(poll, server.name, t0, t1))


def load_window(server: ServeProcess, poll: Poller, cfg: str, loadgen_args: list[str],
                seconds: float, trainer: Optional[ServeProcess] = None) -> tuple[dict, dict]:
  """One load window of configuration `cfg` (A: inference only; D: `server` also
  trains; C: the separate `trainer` process trains): sets the training switches,
  settles 0.5 s, runs `launch.loadgen` against `server` with `loadgen_args` (mode,
  rate, `seconds`, ...), switches training off and returns (the load generator's
  summary, `window_metrics` over its window)."""
  server.training(cfg == "D")
  if trainer is not None:
    trainer.training(cfg == "C")
  time.sleep(0.5)
  r = run_loadgen(server.url, loadgen_args, seconds + 180)
  server.training(False)
  if trainer is not None:
    trainer.training(False)
  time.sleep(0.3)
  return r, window_metrics(poll, cfg, *r["window_unix"], server=server.name,
                           trainer=trainer.name if trainer is not None and cfg == "C" else None)


def scores(train_sps: Optional[float], b_sps: float, u: float, p99_ms: float,
           a_p99_ms: float) -> dict:
  """The co-location scores of one configuration at one load: retention (its training
  samples/s / B's), harvest_efficiency (retention / (1 - U), U = A's inference busy
  fraction) and p99_inflation (its p99 / A's); nan where undefined."""
  retention = (train_sps or 0.0) / b_sps if b_sps else float("nan")
  return {"retention": retention,
          "harvest_efficiency": retention / (1.0 - u) if u < 1 else float("nan"),
          "p99_inflation": p99_ms / a_p99_ms if a_p99_ms else float("nan")}


def window_metrics(poll: Poller, cfg: str, t0: float, t1: float, server: str = "S",
                   trainer: Optional[str] = None) -> dict:
  """The server counters' rates over one load window [t0, t1] (unix s) of `cfg`:
  inference_busy_fraction and device_busy_fraction of `server` (the server under
  test), train_samples_per_s of the training process (`trainer`, by default T for C,
  `server` for D; 0 for A), late_drops_per_s (requests `server` admitted, then dropped
  at dispatch because they would have been late: `serve.drop_late`)."""
  who = trainer or {"C": "T", "D": server}.get(cfg)
  return {"inference_busy_fraction": poll.rate(
              f'{server}:coltrain_inference_busy_seconds_total{{replica="0"}}', t0, t1),
          "device_busy_fraction": device_busy(poll, server, t0, t1),
          "train_samples_per_s": (poll.rate(f"{who}:coltrain_train_samples_total", t0, t1)
                                  if who else 0.0),
          "chunk_ms": chunk_ms(poll, server, t0, t1) if cfg == "D" else None,
          "device_thread": device_thread(poll, server, t0, t1),
          "late_drops_per_s": poll.rate(f"{server}:{LATE_DROPS_KEY}", t0, t1)}


MERGED_RATES = ("inference_busy_fraction", "device_busy_fraction", "train_samples_per_s",
                "chunk_ms", "late_drops_per_s")


def device_thread(poll: Poller, server: str, t0: float, t1: float) -> Optional[dict]:
  """{activity: fraction of wall time} of `server`'s scheduler thread (replica 0) over
  [t0, t1] (`coltrain_device_thread_seconds_total`); None without samples."""
  rates = {a: poll.rate(f"{server}:{k}", t0, t1) for a, k in THREAD_KEYS.items()}
  if any(v is None for v in rates.values()):
    return None
  return {a: round(v, 5) for a, v in rates.items()}


def chunk_ms(poll: Poller, server: str, t0: float, t1: float) -> Optional[float]:
  """The mean training chunk time (ms) of `server` over [t0, t1]; None without chunks."""
  busy = poll.rate(f"{server}:coltrain_train_busy_seconds_total", t0, t1)
  chunks = poll.rate(f"{server}:coltrain_train_chunks_total", t0, t1)
  return 1e3 * busy / chunks if busy is not None and chunks else None


def merge_halves(halves: list[tuple[dict, dict]], slo_ms: float) -> dict:
  """One point from several runs of one configuration and load: `halves` = (point
  record, `loadgen.load_raw` record) per run. Latency, SLO attainment, shedding and the
  tail breakdown are of all their requests together (`loadgen.summarize`); the counter
  rates are time-weighted means over the runs' windows (None if any run lacks one);
  `halves` keeps each run's own figures."""
  recs = [rec for rec, _ in halves]
  first = recs[0]
  merged = loadgen.summarize(loadgen.merge_raw([raw for _, raw in halves]), slo_ms=slo_ms,
                             images_per_request=1, labels=True)
  spans = [rec["window_unix"][1] - rec["window_unix"][0] for rec in recs]
  out = {"config": first["config"], "rho": first["rho"], "arrival": first["arrival"],
         "rate_rps": first["rate_rps"],
         "loadavg_1m": round(float(np.mean([rec["loadavg_1m"] for rec in recs])), 2),
         **merged}
  def time_weighted(vals: list) -> Optional[float]:
    """The runs' values averaged over their windows' lengths (None if one is missing)."""
    if any(v is None for v in vals):
      return None
    return float(np.average(vals, weights=spans if sum(spans) > 0 else None))

  for key in MERGED_RATES:
    out[key] = time_weighted([rec.get(key) for rec in recs])
  threads = [rec.get("device_thread") for rec in recs]
  out["device_thread"] = (None if any(t is None for t in threads) else
                          {a: round(time_weighted([t.get(a, 0.0) for t in threads]), 5)
                           for a in threads[0]})
  out["halves"] = [{"window_unix": rec["window_unix"], "requests": rec.get("requests"),
                    "slo_attainment": rec.get("slo_attainment"),
                    "p99_ms": rec.get("latency_ms", {}).get("p99"),
                    **{key: rec.get(key) for key in MERGED_RATES}} for rec in recs]
  return out


def device_busy(poll: Poller, server: str, t0: float, t1: float) -> Optional[float]:
  """The busy fraction of `server`'s device cores over [t0, t1]: the on-CPU time of its
  threads there (`coltrain_device_cpu_seconds_total`) per second and core; None without
  a device/host split."""
  rate = poll.rate(f"{server}:coltrain_device_cpu_seconds_total", t0, t1)
  cores = max((r.get(f"{server}:coltrain_device_cpus", 0.0) for _, r in poll.samples),
              default=0.0)
  return rate / cores if rate is not None and cores else None


def split_cpus(spec: str) -> tuple[str, frozenset]:
  """('device cpu list' for serve.device_cpus, host cpu set) for --device_cpus."""
  from coltrain.cpus import CpuPartition, check_device_cpus
  allowed = frozenset(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else \
      frozenset(range(os.cpu_count() or 1))
  if spec == "auto":
    spec = str(max(allowed)) if len(allowed) >= 2 else ""
  if not spec:
    return "", allowed
  problem = check_device_cpus(spec)
  if problem:
    raise SystemExit(f"colocate_bench: --device_cpus: {problem}")
  return spec, CpuPartition.from_config(spec).host


def _get(points, cfg, rho, arrival="poisson"):
  for p in points:
    if p["config"] == cfg and p["rho"] == rho and p["arrival"] == arrival:
      return p
  return None


def b_chunk_for(results: dict, rho: float) -> Optional[float]:
  """B's mean chunk time (ms) in the round of `rho`, if measured (runs since the thread
  accounting)."""
  for r in results["B"].get("runs", ()):
    if isinstance(r, dict) and r.get("rho") == rho:
      return r.get("chunk_ms")
  return None


def b_for(results: dict, rho: float) -> float:
  """B's training samples/s to compare the points at `rho` with: the B measured in that
  rho's round of the sweep if there is one, else the mean of all B runs."""
  for r in results["B"].get("runs", ()):
    if isinstance(r, dict) and r.get("rho") == rho and r.get("train_samples_per_s"):
      return r["train_samples_per_s"]
  return results["B"]["train_samples_per_s"] or float("nan")


def summarize(results: dict) -> list[dict]:
  """Per rho and arrival process, for C and D: slo_attainment, p99_inflation (p99 / p99
  of A), retention (training samples/s / B's, `b_for`: the B of the same round),
  harvest_efficiency (retention / (1 - U), U = inference busy fraction in A: the device
  time of its batches), and with a device/host split harvest_efficiency_device
  (retention / (1 - U_device), U_device = the busy fraction of A's device cores: every
  cycle the emulated device spent serving, batching and admission included) and
  harvest_from_idle = (1 - U_device) / (1 - U): the harvest_efficiency of training at
  B's speed on exactly the device cycles A leaves idle. It is a reference, not a bound:
  the configuration's own inference can cost less device time than A's (D serves the
  requests that arrive during a training chunk as one larger batch), which `U_own`, the
  configuration's own inference busy fraction, shows."""
  out = []
  pts = results["points"]
  keys = sorted({(p["rho"], p["arrival"]) for p in pts}, key=lambda k: (k[1] != "poisson", k))
  for rho, arrival in keys:
    a = _get(pts, "A", rho, arrival)
    if a is None:
      continue
    u = a.get("inference_busy_fraction") or 0.0
    u_dev = a.get("device_busy_fraction")
    a_p99 = a.get("latency_ms", {}).get("p99", float("nan"))
    b = b_for(results, rho)
    from_idle = (1.0 - u_dev) / (1.0 - u) if u_dev is not None and u < 1 else None
    for cfg in ("D", "C"):
      x = _get(pts, cfg, rho, arrival)
      if x is None:
        continue
      sc = scores(x["train_samples_per_s"], b, u,
                  x.get("latency_ms", {}).get("p99", float("nan")), a_p99)
      retention = sc["retention"]
      out.append({
          "config": cfg, "rho": rho, "arrival": arrival,
          "slo_attainment": x.get("slo_attainment"),
          "p99_ms": x.get("latency_ms", {}).get("p99"), "p99_A_ms": a_p99,
          "p99_inflation": sc["p99_inflation"],
          "B_samples_per_s": b, "retention": retention, "U": u,
          "harvest_efficiency": sc["harvest_efficiency"],
          "U_device": u_dev,
          "harvest_efficiency_device": (retention / (1.0 - u_dev)
                                        if u_dev is not None and u_dev < 1 else None),
          "harvest_from_idle": from_idle,
          "U_own": x.get("inference_busy_fraction"),
          "slo_attainment_A": a.get("slo_attainment"),
          "shed_fraction": x.get("shed_fraction"),
          **({"chunk_ms": x.get("chunk_ms"), "chunk_ms_B": b_chunk_for(results, rho),
              "device_thread": x.get("device_thread"),
              "device_thread_A": a.get("device_thread")} if cfg == "D" else {})})
  return out


THREAD_GROUPS = (   # results.md's columns: activity groups of the scheduler thread
    ("batches", ("inference",)), ("their results", ("inference_results",)),
    ("receive + admit", ("receive",)), ("decide", ("decide",)),
    ("training chunks", ("training", "training_other")),
    ("held: request incoming", ("wait_incoming",)), ("held: after a shed", ("wait_holdoff",)),
    ("held: input / slack", ("wait_input", "wait_slack")),
    ("idle", ("wait_batch", "wait_idle")))


def thread_table(results: dict) -> list[str]:
  """results.md lines: where A's and D's scheduler thread (the emulated device) spent
  its time per rho (Poisson), and D's chunk time against B's of the same round."""
  rows = [s for s in results.get("summary", ())
          if s["config"] == "D" and s["arrival"] == "poisson" and s.get("device_thread")
          and s.get("device_thread_A")]
  if not rows:
    return []
  lines = ["", "Where the device's scheduler thread spent its time (fractions of wall time, "
           "`coltrain_device_thread_seconds_total`; Poisson), and D's mean training chunk "
           "against B's of the same round:", "",
           "| rho | config | " + " | ".join(g for g, _ in THREAD_GROUPS) + " | chunk (ms) |",
           "| --- | --- | " + " | ".join("---" for _ in THREAD_GROUPS) + " | --- |"]
  for s in rows:
    for cfg, t in (("A", s["device_thread_A"]), ("D", s["device_thread"])):
      cells = [f"{sum(t.get(a, 0.0) for a in acts):.3f}" for _, acts in THREAD_GROUPS]
      chunk = ("" if cfg == "A" or s.get("chunk_ms") is None else
               f"{s['chunk_ms']:.3f}" + (f" (B {s['chunk_ms_B']:.3f})"
                                           if s.get("chunk_ms_B") else ""))
      lines.append(f"| {s['rho']} | {cfg} | " + " | ".join(cells) + f" | {chunk} |")
  return lines


def priority_line(results: dict) -> str:
  """'; load generators ...' for results.md's first line ('' in runs without it)."""
  pr = results.get("conditions", {}).get("priority")
  if not pr:
    return ""
  if pr["loadgen_nice"] is not None:
    return f"; load generators at niceness {pr['loadgen_nice']}"
  if pr["server_nice"] is not None:
    return f"; servers at niceness {pr['server_nice']}"
  return "; no generator priority"


def write_table(results: dict, path: str) -> None:
  cap = results["capacity"]
  closed = (f" (closed-loop best {cap['closed_loop_best_rps']:.0f})"
            if cap.get("closed_loop_best_rps") else "")
  lines = [f"SLO {results['slo_ms']:.2f} ms; capacity {cap['rps']:.0f} req/s{closed}; "
           f"B (training only) {results['B']['train_samples_per_s']:.0f} samples/s (mean of "
           f"its runs; retention uses each rho's own B){priority_line(results)}", "",
           "| arrival | rho | config | SLO attainment | p99 (ms) | p99 of A (ms) | p99 inflation"
           " | B (samples/s) | retention | U (A) | harvest efficiency | U_device (A) |"
           " harvest (device) | harvest from idle | U (own) | A's SLO attainment |",
           "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"
           " --- | --- |"]
  opt = lambda x: "n/a" if x is None else f"{x:.3f}"
  for s in results["summary"]:
    lines.append(
        f"| {s['arrival']} | {s['rho']} | {s['config']} | {s['slo_attainment']:.4f} | "
        f"{s['p99_ms']:.2f} | {s['p99_A_ms']:.2f} | {s['p99_inflation']:.2f} | "
        f"{s['B_samples_per_s']:.0f} | {s['retention']:.3f} | {s['U']:.3f} | "
        f"{s['harvest_efficiency']:.3f} | {opt(s.get('U_device'))} | "
        f"{opt(s.get('harvest_efficiency_device'))} | {opt(s.get('harvest_from_idle'))} | "
        f"{opt(s.get('U_own'))} | {s['slo_attainment_A']:.4f} |")
  lines += thread_table(results)
  tails = [p for p in results["points"]
           if p.get("latency_breakdown_ms", {}).get("tail") and p["config"] in ("A", "D")
           and p["arrival"] == "poisson"]
  if tails:
    lines += ["", "Where the slowest 1 % of the served requests spent their time (Poisson; "
              "means in ms; loadgen `latency_breakdown_ms`):", "",
              "| rho | config | latency | generator late | server queue | compute | rest |",
              "| --- | --- | --- | --- | --- | --- | --- |"]
    for p in sorted(tails, key=lambda p: (p["rho"], p["config"])):
      t = p["latency_breakdown_ms"]["tail"]
      lines.append(f"| {p['rho']} | {p['config']} | {t['latency']:.2f} | "
                   f"{t['dispatch_late']:.2f} | {t['server_queue']:.2f} | {t['compute']:.2f} | "
                   f"{t['rest']:.2f} |")
  lines += ["", "Overload (rho = 1.5, Poisson):", "",
            "| config | offered req/s | served req/s | shed fraction | SLO attainment (all) |"
            " SLO attainment (admitted) | p99 admitted (ms) | generator late p99 (ms) |"
            " SLO attainment (admitted, from the send) | dropped at dispatch (of offered) |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
  for o in results.get("overload", []):
    late = generator_late_p99(o)
    sent = o.get("slo_attainment_admitted_from_send")
    drops = o.get("late_drops_per_s")
    dropped = "n/a" if drops is None else f"{drops / o['rate_rps']:.4f}"
    lines.append(f"| {o['config']} | {o['rate_rps']:.0f} | {o['throughput_rps']:.0f} | "
                 f"{o['shed_fraction']:.3f} | {o.get('slo_attainment', 0):.4f} | "
                 f"{o.get('slo_attainment_admitted', 0):.4f} | "
                 f"{o.get('latency_ms', {}).get('p99', float('nan')):.2f} | "
                 f"{'n/a' if late is None else f'{late:.2f}'} | "
                 f"{'n/a' if sent is None else f'{sent:.4f}'} | "
                 f"{dropped} |")
  m = results.get("malformed")
  if m:
    lines += ["", f"Malformed requests: {m['requests']} -> codes {m['codes']}; ready after: "
              f"{m['ready_after']}; valid request after: {m['valid_request_after']}"]
  lines += ["", f"Load averages (1, 5, 15 min) during the run: {results['conditions']['loadavg']}"]
  with open(path, "w") as f:
    f.write("\n".join(lines) + "\n")


def plot(results: dict, path: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  pts = [p for p in results["points"] if p["arrival"] == "poisson"]
  fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
  for cfg, style in (("A", "k-o"), ("C", "r-s"), ("D", "b-^")):
    xs = [p for p in pts if p["config"] == cfg]
    ax1.plot([p["rho"] for p in xs], [p.get("latency_ms", {}).get("p99", np.nan) for p in xs],
             style, label={"A": "A inference only", "C": "C naive co-location",
                           "D": "D coltrain"}[cfg])
    if cfg != "A":
      ax2.plot([p["rho"] for p in xs], [p["train_samples_per_s"] or 0 for p in xs], style,
               label={"C": "C naive co-location", "D": "D coltrain"}[cfg])
  ax1.axhline(results["slo_ms"], color="gray", ls="--", label="SLO")
  ax1.set_xlabel("load rho (fraction of capacity)")
  ax1.set_ylabel("p99 latency (ms)")
  ax1.set_yscale("log")
  ax1.legend()
  rh = sorted({p["rho"] for p in pts})
  bs = [b_for(results, r) for r in rh]
  ax2.plot(rh, bs, color="gray", ls="--", label="B training only (each rho's round)")
  us = [(_get(pts, "A", r) or {}).get("inference_busy_fraction") or 0 for r in rh]
  ax2.plot(rh, [b * (1 - u) for b, u in zip(bs, us)], "g:", label="B x (1 - U)")
  ud = [(_get(pts, "A", r) or {}).get("device_busy_fraction") for r in rh]
  if all(u is not None for u in ud):
    ax2.plot(rh, [b * (1 - u) for b, u in zip(bs, ud)], "g--",
             label="B x (1 - U_device) (idle cycles)")
  ax2.set_xlabel("load rho (fraction of capacity)")
  ax2.set_ylabel("training samples/s")
  ax2.legend()
  c = results.get("conditions", {})
  where = (f"device core(s) {c['device_cpus']}, host core(s) {c['host_cpus']}"
           if c.get("device_cpus") else f"{c.get('cpus', '?')} shared cores")
  fig.suptitle(f"LeNet / MNIST-5k on CPU ({where}), SLO {results['slo_ms']:.1f} ms")
  fig.tight_layout()
  fig.savefig(path, dpi=110)


if __name__ == "__main__":
  sys.exit(main())
