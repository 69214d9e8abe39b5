"""Splitting a CPU-only machine into an emulated "device" and the host (Linux).

On an accelerator the front end (HTTP, JSON, Python) and the device's work (inference
batches, training chunks) run on different hardware; on a CPU-only machine XLA's
threads and the front end compete for the same cores, and a training chunk then delays
requests that the device would not have delayed. `serve.device_cpus` reserves cores for
the device: XLA's thread pools and the scheduler threads (the device owners) are pinned
to them; the host threads (the HTTP front end, the training input pipeline, the main
thread) run on the remaining cores. Threads created later inherit their creator's set:
XLA work started by a scheduler thread stays on the device cores.
"""

from __future__ import annotations

import dataclasses
import os
import threading
from typing import MutableMapping, Optional

# XLA's CPU runtime by default orders a computation's thunks to run concurrently and
# hands the ready ones to its thread pool. With a pool of one thread (one device core,
# NPROC=1) nothing can run concurrently, and each hand-off wakes the pool thread on the
# caller's core and waits for it: a training chunk ran mostly on the pool thread when
# chunks ran back to back, and on the caller, which then burnt the core spin-waiting
# for the pool, when an inference batch came before it. Off, every computation runs on
# the calling thread. Measured (one process on the device core, three pairs of
# processes, batches of 1/2/4 images between chunks): chunks 563-738 vs 774-825 us
# back to back and 589-818 vs 722-1,037 us with batches between, batches 239-330 vs
# 339-381 us; under 1,500 req/s, two pairs of servers: training only 1,346-1,439 vs
# 1,264-1,312 chunks/s, co-located 534-573 vs 443-477 chunks/s.
XLA_ONE_CORE_FLAG = "--xla_cpu_enable_concurrency_optimized_scheduler=false"


def set_one_core_xla_flags(environ: MutableMapping[str, str] = os.environ) -> None:
  """Before JAX starts: with NPROC=1 (one device core) adds `XLA_ONE_CORE_FLAG` to
  XLA_FLAGS, unless they already set that option."""
  if (environ.get("NPROC") == "1"
      and "xla_cpu_enable_concurrency_optimized_scheduler" not in environ.get("XLA_FLAGS", "")):
    environ["XLA_FLAGS"] = f"{environ.get('XLA_FLAGS', '')} {XLA_ONE_CORE_FLAG}".strip()


def parse_cpu_list(text: str) -> frozenset[int]:
  """'1' / '0,2' / '2-3,6' -> the set of CPU ids; raises ValueError if malformed."""
  cpus: set[int] = set()
  for part in text.replace(" ", "").split(","):
    if not part:
      raise ValueError(f"empty item in CPU list {text!r}")
    lo, sep, hi = part.partition("-")
    try:
      a, b = int(lo), int(hi) if sep else int(lo)
    except ValueError:
      raise ValueError(f"CPU list {text!r}: {part!r} is not an id or a range") from None
    if a < 0 or b < a:
      raise ValueError(f"CPU list {text!r}: bad range {part!r}")
    cpus.update(range(a, b + 1))
  return frozenset(cpus)


def check_device_cpus(text: str) -> Optional[str]:
  """None if `text` ('' = no split) is usable on this machine, else the problem."""
  if not text:
    return None
  if not hasattr(os, "sched_setaffinity"):
    return "'serve.device_cpus' needs Linux (sched_setaffinity); leave it empty"
  try:
    device = parse_cpu_list(text)
  except ValueError as e:
    return f"'serve.device_cpus': {e}"
  allowed = os.sched_getaffinity(0)
  if not device <= allowed:
    return (f"'serve.device_cpus' {text!r} names CPUs {sorted(device - allowed)} this "
            f"process may not use (allowed: {sorted(allowed)})")
  if not allowed - device:
    return (f"'serve.device_cpus' {text!r} leaves no CPU for the front end (allowed: "
            f"{sorted(allowed)}); reserve fewer")
  return None


def benchmark_cpu(requested: Optional[int] = None) -> int:
  """The core a one-core benchmark runs on: `requested`, or the last core this process
  may use if None or negative. Raises ValueError if `requested` is not one of them."""
  allowed = sorted(os.sched_getaffinity(0))
  cpu = allowed[-1] if requested is None or requested < 0 else requested
  if cpu not in allowed:
    raise ValueError(f"--cpu {cpu} is not one of this process's CPUs {allowed}")
  return cpu


def pin_benchmark_cpu(requested: Optional[int] = None) -> Optional[int]:
  """Pins this process to `benchmark_cpu(requested)` and returns that core (call it
  before JAX starts: its threads inherit the affinity). Where the OS has no affinity
  call, pins nothing and returns `requested`. ValueError as `benchmark_cpu`."""
  if not hasattr(os, "sched_setaffinity"):
    return requested
  cpu = benchmark_cpu(requested)
  os.sched_setaffinity(0, {cpu})
  return cpu


@dataclasses.dataclass(frozen=True)
class CpuPartition:
  """Device CPUs and host CPUs (disjoint; host = the allowed CPUs minus the device's)."""
  device: frozenset[int]
  host: frozenset[int]

  @classmethod
  def from_config(cls, text: str) -> Optional["CpuPartition"]:
    """The split `serve.device_cpus` asks for (None for ''); call `check_device_cpus`
    first."""
    if not text:
      return None
    device = parse_cpu_list(text)
    return cls(device, frozenset(os.sched_getaffinity(0)) - device)

  def pin_threads(self) -> dict[int, frozenset[int]]:
    """Pins every current thread of this process: threads started by Python (the main
    thread, the input pipeline's, ...) to the host CPUs, all others (XLA's thread
    pools) to the device CPUs. Returns their previous sets (for `restore`). Threads
    started later inherit their creator's set; device-owner threads call
    `pin_device_thread` themselves."""
    python = {t.native_id for t in threading.enumerate()}
    before = thread_cpus()
    for tid in before:
      try:
        os.sched_setaffinity(tid, self.host if tid in python else self.device)
      except OSError:   # the thread ended meanwhile
        pass
    return before

  def pin_device_thread(self) -> None:
    """Pins the calling thread to the device CPUs."""
    os.sched_setaffinity(0, self.device)

  @staticmethod
  def restore(before: dict[int, frozenset[int]]) -> None:
    for tid, cpus in before.items():
      try:
        os.sched_setaffinity(tid, cpus)
      except OSError:
        pass


def _thread_ids() -> list[int]:
  return [int(t) for t in os.listdir("/proc/self/task")]


class DeviceCpuClock:
  """On-CPU seconds of this process's threads confined to a set of CPUs.

  `seconds()` sums the time on CPU (`/proc/self/task/*/schedstat`, nanoseconds) of every
  current thread whose allowed CPUs lie within `cpus`: with a device/host split, the
  emulated device's work (XLA's pools, the scheduler threads, which also run the parts
  of a computation XLA executes on the calling thread and receive the requests, and
  with several replicas the front end's data thread). Its rate over a
  window is how busy the device cores were, the busy fraction of the emulated device.
  A thread found on the device cores stays counted (threads are pinned once, at
  start-up; the others are checked at every call, so a thread that pins itself later is
  found); a thread that ended no longer counts, so the sum may drop then (the device's
  threads live as long as the server)."""

  def __init__(self, cpus: frozenset[int]):
    self.cpus = frozenset(cpus)
    self._on_device: set[int] = set()

  def seconds(self) -> float:
    total = 0
    current = _thread_ids()
    self._on_device &= set(current)
    for tid in current:
      if tid not in self._on_device:
        try:
          if not frozenset(os.sched_getaffinity(tid)) <= self.cpus:
            continue
        except OSError:   # ended meanwhile
          continue
        self._on_device.add(tid)
      try:
        with open(f"/proc/self/task/{tid}/schedstat") as f:
          total += int(f.read().split()[0])
      except (OSError, ValueError, IndexError):
        continue
    return total / 1e9


def thread_cpus() -> dict[int, frozenset[int]]:
  """{thread id: allowed CPUs} of every thread of this process (for tests, reports)."""
  out = {}
  for tid in _thread_ids():
    try:
      out[tid] = frozenset(os.sched_getaffinity(tid))
    except OSError:
      pass
  return out
