"""Splitting a CPU machine into the emulated device and the host (coltrain.cpus)."""

import json
import os
import subprocess
import sys
import threading
import time

import pytest

from coltrain.config import ConfigError
from coltrain.serve import Server, validate_serve
from coltrain.cpus import DeviceCpuClock, check_device_cpus, parse_cpu_list, thread_cpus
from coltrain.serve.metrics import parse_metrics
from tests.test_serve_server import serve_cfg

pytestmark = pytest.mark.serial   # wall-clock timing: runs alone (pyproject's `serial`)


def test_cpu_lists_parse_ids_and_ranges():
  assert parse_cpu_list("1") == {1}
  assert parse_cpu_list("0,2") == {0, 2}
  assert parse_cpu_list("2-4, 7") == {2, 3, 4, 7}
  for bad in ("", "a", "1,", "3-1", "-1", "1-b"):
    with pytest.raises(ValueError):
      parse_cpu_list(bad)


def test_device_cpus_are_checked_against_this_machine():
  allowed = sorted(os.sched_getaffinity(0))
  assert check_device_cpus("") is None
  assert "may not use" in check_device_cpus(str(max(allowed) + 1000))
  assert "leaves no CPU" in check_device_cpus(",".join(map(str, allowed)))
  assert "not an id" in check_device_cpus("x")
  c = serve_cfg(**{"serve.device_cpus": "x"})
  with pytest.raises(ConfigError, match="device_cpus"):
    validate_serve(c)


def _burner(cpus, seconds, burnt: threading.Event, release: threading.Event):
  """A thread pinned to `cpus` that spends `seconds` on CPU, then waits (alive) for
  `release` (an ended thread no longer counts)."""
  def run():
    os.sched_setaffinity(0, cpus)
    end = time.thread_time() + seconds
    while time.thread_time() < end:
      pass
    burnt.set()
    release.wait(30)
  t = threading.Thread(target=run, daemon=True)
  t.start()
  return t


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2,
                    reason="a device/host split needs at least 2 usable cores")
def test_device_cpu_clock_counts_only_threads_on_the_device_cores():
  allowed = frozenset(os.sched_getaffinity(0))
  device = frozenset({max(allowed)})
  clock = DeviceCpuClock(device)
  before = clock.seconds()
  release = threading.Event()
  on_device, on_host = threading.Event(), threading.Event()
  threads = [_burner(device, 0.3, on_device, release),
             _burner(allowed - device, 0.3, on_host, release)]
  try:
    assert on_device.wait(30) and on_host.wait(30)
    spent = clock.seconds() - before
    # the device burner's 0.3 s, not the host burner's (nor this thread's: all cores)
    assert 0.29 <= spent < 0.45, spent
  finally:
    release.set()
    for t in threads:
      t.join(30)


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2,
                    reason="a device/host split needs at least 2 usable cores")
def test_server_runs_device_work_and_front_end_on_disjoint_cores(tfds_dir):
  allowed = frozenset(os.sched_getaffinity(0))
  device = max(allowed)
  host = allowed - {device}
  before = thread_cpus()
  s = Server(serve_cfg(**{"serve.device_cpus": str(device), "serve.slo_ms": 1000.0}),
             log=lambda m: None).start()
  try:
    import threading
    python = {t.native_id: t.name for t in threading.enumerate()}
    now = thread_cpus()
    assert os.sched_getaffinity(s._http.proc.pid) == host   # the front-end process
    control = {t.name: t for t in s._http._threads}["frontend-control"]
    assert now[control.native_id] == host                   # its control messages
    assert s.schedulers[0].poll == s._http.pump              # requests: the device's thread
    assert now[s.trainer._fetcher.native_id] == host        # the training input
    for sch in s.schedulers:                                # the device owners
      assert now[sch._thread.native_id] == {device}
    native = [tid for tid in now if tid not in python]
    assert native                                           # XLA's pools ...
    for tid in native:
      assert now[tid] == {device}, tid                      # ... on the device core
    from tests.test_serve_server import call, infer_body
    m0 = parse_metrics(call(s, "GET", "/metrics")[1])
    assert call(s, "POST", "/v2/models/digits/infer", infer_body())[0] == 200
    m1 = parse_metrics(call(s, "GET", "/metrics")[1])
    assert m1["coltrain_device_cpus"] == 1
    # the device's threads worked (the inference, the scheduler's loop, training)
    assert m1["coltrain_device_cpu_seconds_total"] > m0["coltrain_device_cpu_seconds_total"]
  finally:
    s.stop()
  after = thread_cpus()
  for tid, cpus in before.items():   # stop() gives the threads their cores back
    if tid in after:
      assert after[tid] == cpus


def test_launch_serve_sizes_xla_pool_to_the_reserved_cores(monkeypatch):
  from launch.serve import _default_nproc
  monkeypatch.delenv("JAX_NUM_CPU_DEVICES", raising=False)
  assert _default_nproc(["--config", "c.py", "--config.serve.device_cpus=1"]) == 1
  assert _default_nproc(["--config.serve.device_cpus", "2-4"]) == 3
  assert _default_nproc([]) == max(2, os.cpu_count() or 1)
  monkeypatch.setenv("JAX_NUM_CPU_DEVICES", "4")
  assert _default_nproc(["--config.serve.device_cpus=1"]) == 8   # collectives need > 4


def _serve_env(argv, **env):
  """XLA_FLAGS as `launch.serve` leaves them when started with `argv`."""
  code = ("import json, os, sys; sys.argv = ['launch.serve'] + sys.argv[1:]; "
          "import launch.serve; print(json.dumps(os.environ.get('XLA_FLAGS')))")
  base = {k: v for k, v in os.environ.items()
          if k not in ("NPROC", "XLA_FLAGS", "JAX_NUM_CPU_DEVICES")}
  out = subprocess.run([sys.executable, "-c", code, *argv], env={**base, **env},
                       capture_output=True, text=True, timeout=120, check=True)
  return json.loads(out.stdout.strip().splitlines()[-1])


def test_launch_serve_runs_xla_inline_on_a_one_core_device():
  from coltrain.cpus import XLA_ONE_CORE_FLAG
  flags = _serve_env(["--config.serve.device_cpus=1"], XLA_FLAGS="--xla_cpu_use_thunk_runtime=true")
  assert flags == f"--xla_cpu_use_thunk_runtime=true {XLA_ONE_CORE_FLAG}"
  assert _serve_env(["--config.serve.device_cpus=1"]) == XLA_ONE_CORE_FLAG
  # a user's own setting wins; several device cores keep XLA's default
  mine = "--xla_cpu_enable_concurrency_optimized_scheduler=true"
  assert _serve_env(["--config.serve.device_cpus=1"], XLA_FLAGS=mine) == mine
  assert _serve_env(["--config.serve.device_cpus=0-1"]) is None
