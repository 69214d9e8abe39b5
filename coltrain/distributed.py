"""Multi-process (multi-host) setup on JAX's own distributed runtime (`jax.distributed`).

Where the process group comes from, first match wins:

  1. explicit settings (`launch.train --coordinator HOST:PORT --num_processes N
     --process_id I`);
  2. `COLTRAIN_COORDINATOR`, `COLTRAIN_NUM_PROCESSES`, `COLTRAIN_PROCESS_ID` in the
     environment (set by `launch.multiprocess` for local runs; the Kubernetes example
     sets the first two and takes the id from an Indexed Job's `JOB_COMPLETION_INDEX`);
  3. SLURM (`srun`, one task per host): `SLURM_NTASKS` > 1, `SLURM_PROCID`, the
     coordinator is the first host of `SLURM_STEP_NODELIST` (or `SLURM_JOB_NODELIST`) on
     port `COLTRAIN_COORDINATOR_PORT` (default: 61440 + SLURM_JOB_ID % 4096).

None of these: a plain single process, `jax.distributed` is not started.

CPU collectives go over gloo. Failures are bounded in time: a peer that never arrives
makes `initialize` fail after `init_timeout` seconds; a peer that dies mid-run is
declared dead by the coordination service after `heartbeat_timeout` seconds, which
then terminates every other process (and a collective that loses its peer fails
sooner, with a gloo error). `fatal` turns such errors into one clear line and an
immediate exit (no waiting for a shutdown barrier that can never complete).
"""

from __future__ import annotations

import dataclasses
import os
import re
import sys
import threading
from typing import Mapping, Optional

ENV_COORDINATOR = "COLTRAIN_COORDINATOR"
ENV_NUM_PROCESSES = "COLTRAIN_NUM_PROCESSES"
ENV_PROCESS_ID = "COLTRAIN_PROCESS_ID"
ENV_PORT = "COLTRAIN_COORDINATOR_PORT"
ENV_HEARTBEAT = "COLTRAIN_HEARTBEAT_TIMEOUT"
ENV_INIT_TIMEOUT = "COLTRAIN_INIT_TIMEOUT"

DEFAULT_HEARTBEAT_TIMEOUT = 30   # seconds without heartbeats before a process is dead
DEFAULT_INIT_TIMEOUT = 300       # seconds to wait for every process to connect
INIT_TIMEOUT_MARGIN = 5          # jaxlib's own deadline, after coltrain's watchdog


@dataclasses.dataclass(frozen=True)
class Settings:
  coordinator: str        # host:port of process 0's coordination service
  num_processes: int
  process_id: int
  source: str             # "flags", "env", "slurm", "kubernetes"
  heartbeat_timeout: int = DEFAULT_HEARTBEAT_TIMEOUT
  init_timeout: int = DEFAULT_INIT_TIMEOUT


class DistributedError(RuntimeError):
  """A process group that cannot be set up (bad settings, a peer that never came)."""


def first_slurm_host(node_list: str) -> str:
  """The first host of a SLURM node list: 'n1', 'n[003-7],x' -> 'n1', 'n003'."""
  m = re.match(r"([^,\[]+)(\[([^,\-\]]+))?", node_list.strip())
  if not m:
    raise DistributedError(f"cannot parse the SLURM node list {node_list!r}")
  return m.group(1) + (m.group(3) or "")


def _slurm_port(env: Mapping[str, str]) -> int:
  if env.get(ENV_PORT):
    return int(env[ENV_PORT])
  # A job-specific port in the ephemeral range (as jax's own SLURM detection does), so
  # two jobs sharing a first node do not collide.
  return int(env.get("SLURM_JOB_ID", "0")) % 4096 + 61440


def _int(env: Mapping[str, str], key: str, what: str) -> int:
  try:
    return int(env[key])
  except (KeyError, ValueError) as e:
    raise DistributedError(f"{what}: ${key} must be an integer, got "
                           f"{env.get(key)!r}") from e


def detect(coordinator: Optional[str] = None, num_processes: Optional[int] = None,
           process_id: Optional[int] = None,
           env: Optional[Mapping[str, str]] = None) -> Optional[Settings]:
  """The process group this process belongs to, or None for a single process."""
  env = os.environ if env is None else env
  heartbeat = int(env.get(ENV_HEARTBEAT) or DEFAULT_HEARTBEAT_TIMEOUT)
  init_timeout = int(env.get(ENV_INIT_TIMEOUT) or DEFAULT_INIT_TIMEOUT)
  timeouts = dict(heartbeat_timeout=heartbeat, init_timeout=init_timeout)
  explicit = (coordinator, num_processes, process_id)
  if any(v is not None for v in explicit):
    if any(v is None for v in explicit):
      raise DistributedError("--coordinator, --num_processes and --process_id go "
                             "together: give all three")
    s = Settings(coordinator, int(num_processes), int(process_id), "flags", **timeouts)
  elif env.get(ENV_COORDINATOR):
    if ENV_PROCESS_ID in env:
      pid, source = _int(env, ENV_PROCESS_ID, "multiprocess"), "env"
    elif "JOB_COMPLETION_INDEX" in env:
      pid, source = _int(env, "JOB_COMPLETION_INDEX", "Kubernetes"), "kubernetes"
    else:
      raise DistributedError(f"${ENV_COORDINATOR} is set but neither ${ENV_PROCESS_ID} "
                             f"nor $JOB_COMPLETION_INDEX (Kubernetes Indexed Job) is")
    s = Settings(env[ENV_COORDINATOR], _int(env, ENV_NUM_PROCESSES, source), pid, source,
                 **timeouts)
  elif env.get("SLURM_JOB_ID") and int(env.get("SLURM_NTASKS", "1") or 1) > 1:
    nodes = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST")
    if not nodes:
      raise DistributedError("SLURM job without $SLURM_STEP_NODELIST/$SLURM_JOB_NODELIST")
    s = Settings(f"{first_slurm_host(nodes)}:{_slurm_port(env)}",
                 _int(env, "SLURM_NTASKS", "SLURM"), _int(env, "SLURM_PROCID", "SLURM"),
                 "slurm", **timeouts)
  else:
    return None
  if s.num_processes < 1 or not 0 <= s.process_id < s.num_processes:
    raise DistributedError(f"process id {s.process_id} is not in [0, {s.num_processes}) "
                           f"(from {s.source})")
  if ":" not in s.coordinator:
    raise DistributedError(f"coordinator {s.coordinator!r} must be HOST:PORT")
  if s.num_processes == 1:
    return None
  return s


def initialize(settings: Settings) -> None:
  """Starts `jax.distributed` (CPU collectives over gloo) for `settings`.

  Raises DistributedError with a clear message if the group does not come together
  within `settings.init_timeout` seconds.
  """
  import jax
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  what = (f"process {settings.process_id} of {settings.num_processes}: the process group "
          f"at {settings.coordinator} did not come together within "
          f"{settings.init_timeout} s (a peer never arrived, or the coordinator is "
          f"unreachable); every process must be started with the same coordinator and "
          f"process count")
  # jaxlib aborts the process (with a terse C++ log) when its own deadline passes; this
  # watchdog fires first and says what happened.
  done = threading.Event()

  def watchdog():
    if not done.wait(settings.init_timeout):
      fatal(f"coltrain: {what}; stopping.", 1)

  threading.Thread(target=watchdog, daemon=True, name="coltrain-init-watchdog").start()
  try:
    jax.distributed.initialize(
        coordinator_address=settings.coordinator, num_processes=settings.num_processes,
        process_id=settings.process_id,
        initialization_timeout=settings.init_timeout + INIT_TIMEOUT_MARGIN,
        heartbeat_timeout_seconds=settings.heartbeat_timeout,
        # With a dead peer the shutdown barrier can never complete: do not wait long.
        shutdown_timeout_seconds=min(settings.heartbeat_timeout, 60))
  except Exception as e:  # jaxlib raises XlaRuntimeError / DEADLINE_EXCEEDED etc.
    raise DistributedError(f"{what} ({type(e).__name__}: {_first_line(e)})") from e
  finally:
    done.set()


def _first_line(e: BaseException) -> str:
  text = str(e).strip().splitlines()
  return text[0][:300] if text else ""


def describe_failure(e: BaseException) -> str:
  """One line saying what went wrong in a multi-process run and what to do."""
  import jax
  return (f"coltrain: process {jax.process_index()} of {jax.process_count()} stopped: "
          f"the process group failed ({type(e).__name__}: {_first_line(e)}). A peer "
          f"probably died or became unreachable; relaunch the same command to resume "
          f"from the last checkpoint.")


def fatal(message: str, status: int = 1) -> None:
  """Prints `message` and exits NOW (no atexit: `jax.distributed.shutdown` would wait
  on a barrier that a dead peer can never reach)."""
  print(message, file=sys.stderr, flush=True)
  sys.stdout.flush()
  os._exit(status)
