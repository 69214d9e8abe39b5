"""What serving costs the device's thread per request, beside the model itself.

  python -m launch.bench_request_path [--sizes 1,4,16] [--iterations 2000] \
      [--rounds 3] [--repo NAME=PATH ...] [--cpu N] [--out bench_request_path.json]

With one replica, `launch.serve`'s scheduler thread is the emulated device: besides its
batches it receives and admits every request (`FrontEndProcess.pump`: the INFER
messages from the request ring, or the data link, `Router.submit`) and answers it
(`DeviceScheduler._run_inference` after the device call: metrics, timing estimates,
results encoded and written to the front end). On this CPU emulation that work takes
the cycles training would harvest. This benchmark builds the default server
(`configs/serve.py`, SLO 10 ms, training active, not started: no HTTP), replaces its
front end by a socket pair (and a request ring where the server uses one) and its model
by a stub that returns logits at once, and per round and batch size k times
`--iterations` passes of: k INFER messages put in the ring (else written to the data
link), one `pump` (the time counted as **admit**), then the batch taken and run (**results**: `_run_inference` with the stub,
the results written; the reader drains them). It reports microseconds per request
(median over rounds), and as the baseline of the same run the real model's device time
per image in a batch of k (the batch's predict call / k): **overhead** = (admit +
results) / that.

With `--repo NAME=PATH` the same measurement also runs from another checkout (e.g. an
older commit, `git worktree add`), each checkout in its own process, alternating round
by round; the summary adds each checkout's time relative to this one's.

  python -m launch.bench_request_path --measure --sizes ... --iterations N   (internal:
      one round of this checkout, JSON on stdout)
"""

from __future__ import annotations

import os
import sys

from coltrain.cpus import pin_benchmark_cpu, set_one_core_xla_flags

os.environ.setdefault("NPROC", "1")   # one core, as `launch.serve` with one device core
set_one_core_xla_flags()

import argparse  # noqa: E402
import inspect  # noqa: E402
import json  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402
from typing import Optional  # noqa: E402

import numpy as np  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class _StubPredictor:
  """The server's predictor with the device call replaced: logits (n, 10) at once."""

  def __init__(self, real):
    self.real = real
    self.buckets, self.max_batch = real.buckets, real.max_batch
    self.image_shape, self.device = real.image_shape, real.device
    self._logits = np.zeros((real.max_batch, 10), np.float32)

  def bucket_for(self, n: int) -> int:
    return self.real.bucket_for(n)

  def __call__(self, weights, images):
    return self._logits[:images.shape[0]]


def _batch_taker(sch):
  """sch -> a function taking the scheduler's next batch with the checkout's own
  `_take_batch` (since 03f15bd it takes `now`, returns (batch, late, end) and checks
  for late requests, which is part of the serving work measured; before, it returned
  the batch alone). The signature is read once, not per batch."""
  from coltrain.serve.timing import clock
  if "now" not in inspect.signature(sch._take_batch).parameters:
    return sch._take_batch

  def take() -> list:
    batch, late, _ = sch._take_batch(clock())
    if late:
      raise RuntimeError(f"{len(late)} requests dropped as late")
    return batch
  return take


def measure(sizes: list[int], iterations: int) -> dict:
  """One round in this process (this checkout's code): per size k, admit and results
  microseconds per request and the real model's device microseconds per image."""
  import socket
  import threading

  from configs.serve import get_config
  from coltrain.serve import wire
  from coltrain.serve.server import Server
  from coltrain.serve.timing import clock

  config = get_config()
  config.serve.slo_ms = 10.0
  config.serve.port = 0
  server = Server(config, log=lambda msg: None)
  bridge, sch = server._http, server.schedulers[0]
  mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
  mine.setblocking(False)
  bridge._data = mine                     # the front end's end: `theirs`
  sch.results_done = bridge.flush_results
  server.router.slo_s = 0.010
  # this thread plays the scheduler thread, which admits what it receives itself (its
  # `submit` then wakes no one)
  sch._ident = threading.get_ident()
  real = sch.predictor
  image = np.random.default_rng(0).random((1,) + real.image_shape, np.float32)
  producer = None
  if getattr(bridge, "use_ring", False):   # the request ring (older checkouts: the socket)
    from coltrain.serve.ring import FrameRing, capacity_for
    producer, fd = FrameRing.create(
        capacity_for(wire.infer_bytes(real.max_batch, real.image_shape)))
    bridge._ring = FrameRing.attach(fd)
    os.close(fd)
  out = {}
  for k in sizes:
    if k > real.max_batch:
      raise ValueError(f"size {k} > the server's max batch {real.max_batch}")
    x = np.repeat(image, k, 0)
    device = []
    for _ in range(max(20, iterations // 50)):
      t0 = clock()
      real(sch.weights, x)
      device.append(clock() - t0)
    sch.predictor = _StubPredictor(real)
    take_batch = _batch_taker(sch)
    admit = results = 0.0
    for it in range(iterations + 100):      # the first 100: warm-up
      now = clock()
      messages = [wire.infer(i, now, None, image) for i in range(k)]
      if producer is not None:
        producer.put(messages)
      else:
        theirs.sendall(b"".join(messages))
      t0 = clock()
      bridge.pump(0.0)
      t1 = clock()
      batch = take_batch()
      sch._run_inference(batch)
      t2 = clock()
      theirs.recv(1 << 20)
      if len(batch) != k:
        raise RuntimeError(f"admitted {len(batch)} of {k} requests (shed?)")
      if it >= 100:
        admit += t1 - t0
        results += t2 - t1
    sch.predictor = real
    out[str(k)] = {"admit_us": 1e6 * admit / iterations / k,
                   "results_us": 1e6 * results / iterations / k,
                   "device_us_per_image": 1e6 * float(np.median(device)) / k}
  mine.close()
  theirs.close()
  return out


def _run_round(repo: str, sizes: list[int], iterations: int, cpu: int) -> dict:
  env = dict(os.environ, PYTHONPATH=repo)
  proc = subprocess.run(   # this file, importing `repo`'s coltrain and configs
      [sys.executable, os.path.abspath(__file__), "--measure", "--cpu", str(cpu),
       "--sizes", ",".join(map(str, sizes)), "--iterations", str(iterations)],
      cwd=repo, env=env, capture_output=True, text=True, timeout=600)
  if proc.returncode != 0:
    raise RuntimeError(f"measuring {repo} failed:\n{proc.stderr[-3000:]}")
  return json.loads(proc.stdout.strip().splitlines()[-1])


def summarize(rounds: dict[str, list[dict]], sizes: list[int]) -> list[dict]:
  """Median per checkout and size; `vs_this`: the checkout's admit + results over this
  checkout's ("this", measured in the same run)."""
  rows = []
  for name, runs in rounds.items():
    for k in sizes:
      med = {f: float(np.median([r[str(k)][f] for r in runs]))
             for f in ("admit_us", "results_us", "device_us_per_image")}
      total = med["admit_us"] + med["results_us"]
      rows.append({"checkout": name, "size": k, **med, "serving_us": total,
                   "overhead": total / med["device_us_per_image"]})
  this = {row["size"]: row["serving_us"] for row in rows if row["checkout"] == "this"}
  for row in rows:
    row["vs_this"] = row["serving_us"] / this[row["size"]]
  return rows


def main(argv: Optional[list[str]] = None) -> int:
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--sizes", default="1,4,16", help="requests (of one image) per batch")
  p.add_argument("--iterations", type=int, default=2000, help="timed batches per size")
  p.add_argument("--rounds", type=int, default=3)
  p.add_argument("--repo", action="append", default=[],
                 help="NAME=PATH: also measure the checkout at PATH")
  p.add_argument("--cpu", type=int, default=None, help="core to run on (default: the last)")
  p.add_argument("--measure", action="store_true", help=argparse.SUPPRESS)
  p.add_argument("--out", default="bench_request_path.json")
  a = p.parse_args(argv)
  try:
    sizes = [int(s) for s in a.sizes.split(",") if s.strip()]
  except ValueError:
    p.error(f"--sizes must be integers, got {a.sizes!r}")
  if not sizes or min(sizes) < 1 or a.iterations < 1 or a.rounds < 1:
    p.error("--sizes must be >= 1, --iterations and --rounds >= 1")
  try:
    cpu = pin_benchmark_cpu(a.cpu)   # before JAX starts: its threads inherit it
  except ValueError as e:
    p.error(str(e))
  if a.measure:
    print(json.dumps(measure(sizes, a.iterations)))
    return 0
  repos = {"this": REPO}
  for spec in a.repo:
    name, sep, path = spec.partition("=")
    if not sep or not name or name in repos:
      p.error(f"--repo must be NAME=PATH with a new NAME, got {spec!r}")
    if not os.path.exists(os.path.join(path, "coltrain", "serve", "bridge.py")):
      p.error(f"--repo {spec}: no coltrain serving code there")
    repos[name] = path
  rounds: dict[str, list[dict]] = {name: [] for name in repos}
  t_start = time.time()
  for r in range(a.rounds):
    order = list(repos) if r % 2 == 0 else list(repos)[::-1]
    for name in order:
      rounds[name].append(_run_round(repos[name], sizes, a.iterations, cpu))
      print(f"bench_request_path: round {r} {name} done", file=sys.stderr)
  summary = summarize(rounds, sizes)
  print("| checkout | requests per batch | admit (us/request) | results (us/request) | "
        "device (us/image) | serving / device | serving vs this |")
  print("| --- | --- | --- | --- | --- | --- | --- |")
  for row in summary:
    print(f"| {row['checkout']} | {row['size']} | {row['admit_us']:.1f} | "
          f"{row['results_us']:.1f} | {row['device_us_per_image']:.0f} | "
          f"{row['overhead']:.3f} | {row['vs_this']:.3f} |")
  with open(a.out, "w") as f:
    json.dump({"repos": repos, "sizes": sizes, "iterations": a.iterations, "cpu": cpu,
               "wall_s": time.time() - t_start, "rounds": rounds, "summary": summary},
              f, indent=2)
  print(f"wrote {a.out}", file=sys.stderr)
  return 0


if __name__ == "__main__":
  sys.exit(main())
