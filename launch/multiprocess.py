"""Run one training job as N local JAX processes (jax.distributed over 127.0.0.1).

  python -m launch.multiprocess --processes 4 --devices_per_process 2 -- \
      --config configs/default.py --config.comm.workers=8 --workdir runs/mp

Starts N `python -m launch.train <arguments after -->` processes with
COLTRAIN_COORDINATOR=127.0.0.1:<a free port>, COLTRAIN_NUM_PROCESSES=N,
COLTRAIN_PROCESS_ID=i, JAX_NUM_CPU_DEVICES=D and NPROC >= 2 D (XLA's CPU thread pool,
per process); each joins the `jax.distributed` group (CPU collectives over gloo) and
they train one global job. Process 0's output passes through; the others' lines are
prefixed with `[process i]`.

Faults: when a process fails, the launcher says which and how, waits up to --grace
seconds for the others (the distributed runtime stops them after --heartbeat_timeout),
reports how each one ended, and SIGKILLs whatever is left; it never leaves processes
behind (children also die with the launcher). Its exit status is the first failure's
(128 + signal for a signal). SIGINT/SIGTERM to the launcher are passed on as SIGTERM:
every process stops after the same step with a checkpoint (exit 143); a second signal
kills them. Rerunning the same command resumes from the last checkpoint, also with a
different --processes/--devices_per_process.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import signal
import socket
import subprocess
import sys
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PREFIX = "launch.multiprocess:"
TRAIN_MODULE = "launch.train"  # what each process runs (`python -m TRAIN_MODULE ...`)


def free_port() -> int:
  """A TCP port on 127.0.0.1 that was free a moment ago."""
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _die_with_parent() -> None:  # runs in the child between fork and exec
  try:
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
  except OSError:  # pragma: no cover - not Linux
    pass


def child_env(base: dict, *, process_id: int, processes: int, devices: int, port: int,
              heartbeat_timeout: int, init_timeout: int) -> dict:
  env = dict(base)
  env.update({
      "COLTRAIN_COORDINATOR": f"127.0.0.1:{port}",
      "COLTRAIN_NUM_PROCESSES": str(processes),
      "COLTRAIN_PROCESS_ID": str(process_id),
      "COLTRAIN_HEARTBEAT_TIMEOUT": str(heartbeat_timeout),
      "COLTRAIN_INIT_TIMEOUT": str(init_timeout),
      "JAX_NUM_CPU_DEVICES": str(devices),
      # Per process: XLA's CPU thread pool must exceed the local device count.
      "NPROC": str(max(2 * devices, int(base.get("NPROC") or 0))),
      "PYTHONPATH": os.pathsep.join(p for p in (REPO, base.get("PYTHONPATH")) if p),
  })
  return env


def _pump(stream, index: int) -> None:
  """Copies a non-zero process's output line by line, prefixed, without gloo chatter."""
  for raw in iter(stream.readline, b""):
    line = raw.decode(errors="replace").rstrip("\n")
    if line.startswith("[Gloo]"):
      continue
    sys.stderr.write(f"[process {index}] {line}\n")
    sys.stderr.flush()
  stream.close()


def _describe(rc: int) -> str:
  if rc < 0:
    name = signal.Signals(-rc).name
    what = {"SIGABRT": " (terminated by the jax.distributed runtime)",
            "SIGKILL": " (killed)"}.get(name, "")
    return f"by {name}{what}"
  return f"with status {rc}"


def _status(rc: int) -> int:
  return 128 - rc if rc < 0 else rc


def main(argv: list[str] | None = None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  if "--" in argv:
    i = argv.index("--")
    own, train_args = argv[:i], argv[i + 1:]
  else:
    own, train_args = argv, []
  ap = argparse.ArgumentParser(prog="python -m launch.multiprocess",
                               description=__doc__.split("\n\n")[0])
  ap.add_argument("--processes", type=int, required=True)
  ap.add_argument("--devices_per_process", type=int, default=1)
  ap.add_argument("--port", type=int, default=0, help="coordinator port (0: a free one)")
  ap.add_argument("--heartbeat_timeout", type=int, default=10,
                  help="seconds without heartbeats before a process counts as dead")
  ap.add_argument("--init_timeout", type=int, default=60,
                  help="seconds for all processes to join the group")
  ap.add_argument("--grace", type=float, default=None,
                  help="seconds the others get to stop on their own after a failure "
                       "(default: heartbeat timeout + 30) before they are killed")
  args = ap.parse_args(own)
  if args.processes < 1 or args.devices_per_process < 1:
    ap.error("--processes and --devices_per_process must be >= 1")
  if not train_args:
    ap.error("give the launch.train arguments after --")
  grace = args.grace if args.grace is not None else args.heartbeat_timeout + 30
  port = args.port or free_port()
  n = args.processes

  procs: list[subprocess.Popen] = []
  pumps: list[threading.Thread] = []
  t0 = time.monotonic()
  for i in range(n):
    env = child_env(os.environ, process_id=i, processes=n,
                    devices=args.devices_per_process, port=port,
                    heartbeat_timeout=args.heartbeat_timeout,
                    init_timeout=args.init_timeout)
    piped = i > 0
    p = subprocess.Popen([sys.executable, "-m", TRAIN_MODULE, *train_args], env=env,
                         start_new_session=True, preexec_fn=_die_with_parent,
                         stdout=subprocess.PIPE if piped else None,
                         stderr=subprocess.STDOUT if piped else None)
    procs.append(p)
    if piped:
      t = threading.Thread(target=_pump, args=(p.stdout, i), daemon=True)
      t.start()
      pumps.append(t)
  print(f"{PREFIX} {n} processes x {args.devices_per_process} device(s), coordinator "
        f"127.0.0.1:{port}, pids " + " ".join(f"{i}={p.pid}" for i, p in enumerate(procs)),
        file=sys.stderr, flush=True)

  signals: list[int] = []

  def on_signal(signum, frame):
    del frame
    signals.append(signum)
    if len(signals) == 1:
      print(f"{PREFIX} got signal {signum}: asking every process to checkpoint and stop "
            f"(signal again to kill them)", file=sys.stderr, flush=True)
      for p in procs:
        if p.poll() is None:
          p.send_signal(signal.SIGTERM)
    else:
      for p in procs:
        _kill(p)

  old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
  # One waiter thread per process records when it ended, so that the first failure is
  # the one that really ended first, even when a survivor follows within one poll tick.
  exit_times: dict[int, float] = {}
  waiters = [threading.Thread(target=_wait_and_time, args=(p, i, exit_times), daemon=True)
             for i, p in enumerate(procs)]
  for w in waiters:
    w.start()
  reported: set[int] = set()   # processes whose end was reported
  first_failure: tuple[int, int, float] | None = None
  try:
    while len(reported) < n:
      time.sleep(0.05)
      now = time.monotonic()
      new_ends = sorted((t, i) for i, t in list(exit_times.items()) if i not in reported)
      for t_end, i in new_ends:
        reported.add(i)
        rc = procs[i].returncode
        if rc != 0 and first_failure is None and not signals:
          first_failure = (i, rc, t_end)
          print(f"{PREFIX} process {i} exited {_describe(rc)} after "
                f"{t_end - t0:.1f} s; the others should stop within the "
                f"{args.heartbeat_timeout} s heartbeat timeout (killed after {grace:.0f} s)",
                file=sys.stderr, flush=True)
        elif first_failure is not None:
          print(f"{PREFIX} process {i} exited {_describe(rc)} on its own, "
                f"{t_end - first_failure[2]:.1f} s after process {first_failure[0]} failed",
                file=sys.stderr, flush=True)
      if first_failure is not None and now - first_failure[2] > grace:
        for i, p in enumerate(procs):
          if p.poll() is None:
            _kill(p)
            print(f"{PREFIX} process {i} did not stop within {grace:.0f} s: killed",
                  file=sys.stderr, flush=True)
  finally:
    for p in procs:  # no orphans, whatever happened
      if p.poll() is None:
        _kill(p)
    for p in procs:
      try:
        p.wait(timeout=30)
      except subprocess.TimeoutExpired:  # pragma: no cover
        pass
    for t in pumps + waiters:
      t.join(timeout=5)
    for s, h in old.items():
      signal.signal(s, h)

  codes = [p.returncode for p in procs]
  if first_failure is not None:
    i, rc, _ = first_failure
    print(f"{PREFIX} the run failed (process {i} exited {_describe(rc)}); rerun the same "
          f"command to resume from the last checkpoint", file=sys.stderr, flush=True)
    return _status(rc)
  bad = [c for c in codes if c != 0]
  return _status(bad[0]) if bad else 0


def _wait_and_time(p: subprocess.Popen, i: int, exit_times: dict[int, float]) -> None:
  """Waits for process `i` and records when it ended (time.monotonic())."""
  p.wait()
  exit_times[i] = time.monotonic()


def _kill(p: subprocess.Popen) -> None:
  try:
    os.killpg(p.pid, signal.SIGKILL)
  except ProcessLookupError:
    pass


if __name__ == "__main__":
  sys.exit(main())
