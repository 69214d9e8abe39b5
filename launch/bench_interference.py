"""Interference on a shared device core: how long a training chunk takes after each kind
of work that co-location puts before it.

  python -m launch.bench_interference [--config configs/serve.py] [--config.serve.X=...]
      [--chunks 6000] [--nth 1] [--cpu N] [--cpu_latency_us US] [--out results.json]

On a CPU-emulated device the scheduler thread runs everything on the device core:
inference batches, the serving work around them (reading and answering requests,
system calls), waits, and training chunks. A chunk that follows that work can run
longer than one that follows another chunk (colder caches and predictors, a core
that went idle). This benchmark measures it in one process on one core, without a
server or load, so that machine noise affects every kind alike:

* it builds the served setup of `--config` (`coltrain.serve.Server`: the same
  `ChunkTrainer`, `Predictor` and warm-up; nothing is started), pins XLA and this
  thread to core `--cpu` and the other Python threads (the input pipeline) to the
  other cores, with XLA on the calling thread and synchronous dispatch, as
  `launch.serve` runs a one-core device;
* `--chunks` times: picks one kind of in-between work at random (seeded), runs it,
  then runs training chunks (`ChunkTrainer.run_chunk`) and times the `--nth` of them
  (default the first; 2 shows whether the next chunk is back to speed). The kinds
  interleave round by round, so slow spells of the machine fall on all of them;
* per kind: the chunks' median (microseconds), a bootstrap 90 % interval of the median,
  the ratio to the median after `none` (chunks back to back, as in training only) with
  its bootstrap interval, and the in-between work's own median time.

Kinds (`KINDS`): none; an inference batch of 1, 2 or 8 images; `python`: the device
thread's own Python work for two requests (decoding two INFER messages of the data
link, `Pending` records, encoding two results; `coltrain.serve.wire`); `syscalls`: three
socket round trips and a zero-timeout `select`; `sleep_50us`, `sleep_300us`: the thread
blocks (the core can go idle); `spin_300us`: the thread stays busy as long; `serving`:
python, syscalls, a batch of 2 and python again (what the scheduler thread does between
two chunks under load). A chunk whose input was not ready (the thread had to wait) is
dropped and counted.

`--cpu_latency_us US` holds a CPU wake-up latency request (`/dev/cpu_dma_latency`,
Linux PM QoS; needs write access, usually root) for the measurement, e.g. 0 to keep
idle cores out of sleep states.
"""

from __future__ import annotations

import os
import random
import select
import socket
import struct
import sys
import time
from typing import Callable, Optional

from coltrain.cpus import benchmark_cpu, set_one_core_xla_flags

os.environ.setdefault("NPROC", "1")   # one device core, as `launch.serve` with one
set_one_core_xla_flags()

import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

KINDS = ("none", "batch_1", "batch_2", "batch_8", "python", "syscalls", "sleep_50us",
         "sleep_300us", "spin_300us", "serving")


def make_kinds(predictor, weights, clock=time.perf_counter) -> dict[str, Callable[[], None]]:
  """The in-between work of every kind in `KINDS`, as functions of no arguments."""
  from coltrain.serve import wire
  from coltrain.serve.scheduler import Pending

  shape = predictor.image_shape
  images = {n: np.zeros((n,) + shape, np.float32) for n in (1, 2, 8)}
  request = np.random.default_rng(0).random((1,) + shape, np.float32)
  logits = np.zeros((1, 10), np.float32)
  reader = wire.Reader()
  a, b = socket.socketpair()

  def python() -> None:
    done = []
    for key in range(2):
      for _, payload in reader.feed(wire.infer(key, clock(), 6.0, request)):
        k, arrival, deadline_ms, x = wire.read_infer(payload, shape)
        p = Pending(x, arrival, arrival + (deadline_ms or 6.0) / 1e3)
        p.result = {"logits": logits, "version": 1, "queue_ms": 0.1, "compute_ms": 0.2,
                    "replica": 0, "batch_size": 2}
        done.append((k, p))
    b"".join(wire.result_ok(k, p.result, clock()) for k, p in done)

  def syscalls() -> None:
    for _ in range(3):
      a.send(b"x" * 200)
      b.recv(4096)
    select.select([a], [], [], 0)

  def spin(seconds: float) -> None:
    end = clock() + seconds
    while clock() < end:
      pass

  def serving() -> None:
    python()
    syscalls()
    predictor(weights, images[2])
    python()

  return {"none": lambda: None,
          "batch_1": lambda: predictor(weights, images[1]),
          "batch_2": lambda: predictor(weights, images[2]),
          "batch_8": lambda: predictor(weights, images[8]),
          "python": python, "syscalls": syscalls,
          "sleep_50us": lambda: time.sleep(50e-6),
          "sleep_300us": lambda: time.sleep(300e-6),
          "spin_300us": lambda: spin(300e-6),
          "serving": serving}


def measure(run_chunk: Callable[[], object], input_ready: Callable[[], bool],
            kinds: dict[str, Callable[[], None]], chunks: int, seed: int,
            clock=time.perf_counter, nth: int = 1) -> dict:
  """Runs `chunks` rounds of (random kind's work, `nth` chunks), timing the `nth` chunk
  after the work (the ones before it run untimed). Returns per kind the timed chunks'
  seconds and the work's seconds (lists), and the rounds dropped because the timed
  chunk's input was not ready."""
  rng = random.Random(seed)
  names = list(kinds)
  chunk_s = {k: [] for k in names}
  work_s = {k: [] for k in names}
  dropped = 0
  for _ in range(chunks):
    name = rng.choice(names)
    t0 = clock()
    kinds[name]()
    t1 = clock()
    for _ in range(nth - 1):
      run_chunk()
    waited = False
    while not input_ready():
      waited = True
      time.sleep(0.0005)
    t2 = clock()
    run_chunk()
    t3 = clock()
    if waited:
      dropped += 1
      continue
    chunk_s[name].append(t3 - t2)
    work_s[name].append(t1 - t0)
  return {"chunk_s": chunk_s, "work_s": work_s, "dropped": dropped}


def _median_interval(x: np.ndarray, rng: np.random.Generator, resamples: int,
                     ) -> tuple[float, float, np.ndarray]:
  """Bootstrap 5th and 95th percentiles of the median of x, and the resampled medians."""
  idx = rng.integers(0, len(x), size=(resamples, len(x)))
  meds = np.median(x[idx], axis=1)
  return float(np.percentile(meds, 5)), float(np.percentile(meds, 95)), meds


def summarize(raw: dict, resamples: int = 1000, seed: int = 0) -> dict[str, dict]:
  """Per kind (with at least one chunk): n, median_us, ci90_us [lo, hi], mean_us,
  ratio (median / median after `none`), ratio_ci90, work_us (the in-between work's
  median). Times in microseconds."""
  rng = np.random.default_rng(seed)
  base = np.asarray(raw["chunk_s"].get("none", []), float) * 1e6
  base_meds = _median_interval(base, rng, resamples)[2] if len(base) else None
  out = {}
  for name, values in raw["chunk_s"].items():
    x = np.asarray(values, float) * 1e6
    if not len(x):
      continue
    lo, hi, meds = _median_interval(x, rng, resamples)
    row = {"n": int(len(x)), "median_us": float(np.median(x)), "ci90_us": [lo, hi],
           "mean_us": float(x.mean()),
           "work_us": float(np.median(np.asarray(raw["work_s"][name], float) * 1e6))}
    if base_meds is not None:
      ratios = meds / base_meds
      row["ratio"] = float(np.median(x) / np.median(base))
      row["ratio_ci90"] = [float(np.percentile(ratios, 5)), float(np.percentile(ratios, 95))]
    out[name] = row
  return out


def table(summary: dict[str, dict]) -> str:
  lines = ["| after | chunks | chunk median (us) | 90 % interval | ratio to none | 90 % interval "
           "| the work itself (us) |", "| --- | --- | --- | --- | --- | --- | --- |"]
  for name, r in summary.items():
    ratio = (f"{r['ratio']:.3f} | [{r['ratio_ci90'][0]:.3f}, {r['ratio_ci90'][1]:.3f}]"
             if "ratio" in r else " | ")
    lines.append(f"| {name} | {r['n']} | {r['median_us']:.0f} | [{r['ci90_us'][0]:.0f}, "
                 f"{r['ci90_us'][1]:.0f}] | {ratio} | {r['work_us']:.1f} |")
  return "\n".join(lines)


def _hold_cpu_latency(us: int) -> int:
  """Opens /dev/cpu_dma_latency and requests `us` microseconds (held while the file
  descriptor stays open). Raises OSError if not permitted."""
  fd = os.open("/dev/cpu_dma_latency", os.O_WRONLY)
  os.write(fd, struct.pack("i", us))
  return fd


def _define_flags() -> None:
  """The command line (defined only when run as a program, so that importing this
  module, e.g. in tests beside `launch.serve`, defines no absl flags)."""
  global _CONFIG, _CHUNKS, _NTH, _CPU, _SEED, _BOOTSTRAP, _CPU_LATENCY, _OUT
  _CONFIG = config_flags.DEFINE_config_file(
      "config", os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                             "configs", "serve.py"),
      "Serving config (its model, micro-batch and chunk are measured).", lock_config=False)
  _CHUNKS = flags.DEFINE_integer("chunks", 6000, "Rounds (work, then chunks, one of them "
                                  "timed), all kinds together.")
  _NTH = flags.DEFINE_integer("nth", 1, "Time the nth chunk after the work (1: the next).")
  _CPU = flags.DEFINE_integer("cpu", -1, "The device core (default: the last allowed one).")
  _SEED = flags.DEFINE_integer("seed", 0, "Seed of the kinds' random order.")
  _BOOTSTRAP = flags.DEFINE_integer("bootstrap", 1000, "Bootstrap resamples per interval.")
  _CPU_LATENCY = flags.DEFINE_integer(
      "cpu_latency_us", -1, "Hold this PM QoS CPU latency request (/dev/cpu_dma_latency) "
      "while measuring; -1: none.")
  _OUT = flags.DEFINE_string("out", None, "Write the results here (JSON).")


def main(argv) -> Optional[int]:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  for flag in (_CHUNKS, _NTH, _BOOTSTRAP):
    if flag.value < 1:
      print(f"bench_interference: --{flag.name} must be >= 1, got {flag.value}",
            file=sys.stderr)
      return 2
  allowed = sorted(os.sched_getaffinity(0))
  try:
    cpu = benchmark_cpu(_CPU.value)
  except ValueError as e:
    print(f"bench_interference: {e}", file=sys.stderr)
    return 2
  latency_fd = None
  if _CPU_LATENCY.value >= 0:
    try:
      latency_fd = _hold_cpu_latency(_CPU_LATENCY.value)
    except OSError as e:
      print(f"bench_interference: --cpu_latency_us needs write access to "
            f"/dev/cpu_dma_latency: {e}", file=sys.stderr)
      return 2

  import jax
  from coltrain.config import ConfigError
  from coltrain.cpus import CpuPartition
  from coltrain.serve import Server

  jax.config.update("jax_cpu_enable_async_dispatch", False)
  config = _CONFIG.value
  config.serve.train = True
  config.serve.replicas = 1
  config.serve.device_cpus = ""   # pinned here, below
  try:
    server = Server(config, log=lambda msg: print(f"bench_interference: {msg}",
                                                  file=sys.stderr))
  except ConfigError as e:
    print(f"bench_interference: {e}", file=sys.stderr)
    return 2
  # The server is stopped before the process exits: its training-input thread must not
  # be running while the interpreter shuts down (CI saw one such run abort at exit:
  # "terminate called without an active exception").
  try:
    scheduler = server.schedulers[0]
    trainer = scheduler.trainer
    trainer.enabled = True
    partition = CpuPartition(frozenset({cpu}), frozenset(allowed) - {cpu} or frozenset({cpu}))
    partition.pin_threads()
    partition.pin_device_thread()
    kinds = make_kinds(scheduler.predictor, scheduler.weights)
    measure(trainer.run_chunk, trainer.input_ready, kinds, min(200, _CHUNKS.value),
            _SEED.value + 1)   # warm-up (not kept)
    t0 = time.time()
    raw = measure(trainer.run_chunk, trainer.input_ready, kinds, _CHUNKS.value, _SEED.value,
                  nth=_NTH.value)
    seconds = time.time() - t0
  finally:
    server.stop()
  summary = summarize(raw, _BOOTSTRAP.value, _SEED.value)
  if latency_fd is not None:
    os.close(latency_fd)
  result = {"config": {"model": config.model, "micro_batch_size": config.serve.micro_batch_size,
                       "chunk_steps": config.serve.chunk_steps},
            "cpu": cpu, "chunks": _CHUNKS.value, "nth": _NTH.value, "dropped": raw["dropped"],
            "seconds": seconds, "seed": _SEED.value,
            "cpu_latency_us": _CPU_LATENCY.value if latency_fd is not None else None,
            "environment": {"NPROC": os.environ.get("NPROC"),
                            "XLA_FLAGS": os.environ.get("XLA_FLAGS", "")},
            "summary": summary}
  print(table(summary))
  print(f"{_CHUNKS.value} chunks ({raw['dropped']} dropped: input not ready) in "
        f"{seconds:.1f} s on core {cpu}")
  if _OUT.value:
    import json
    os.makedirs(os.path.dirname(os.path.abspath(_OUT.value)), exist_ok=True)
    with open(_OUT.value, "w") as f:
      json.dump(result, f, indent=1)
  return 0


if __name__ == "__main__":
  _define_flags()
  app.run(main)
