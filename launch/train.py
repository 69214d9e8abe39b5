"""Train from a config file.

  python -m launch.train --config configs/default.py [--config.KEY=VALUE ...] \
      [--workdir DIR]

Rerunning with the same --workdir resumes from its latest checkpoint. SIGINT/SIGTERM
save a checkpoint after the current step and exit with status 128+signal (130/143).

Several workers (`--config.comm.workers=W`) are stacked over the local devices; to spread
them over simulated CPU devices set JAX_NUM_CPU_DEVICES (NPROC, XLA's CPU thread pool,
is then set to at least twice that unless given).

Multi-host: one `launch.train` per host (or per process) joins a `jax.distributed`
process group described by --coordinator/--num_processes/--process_id, by the
COLTRAIN_* variables `launch.multiprocess` and the Kubernetes example set, or by SLURM
(see `coltrain.distributed`). Every process reads only its slice of the data; process 0
writes the outputs. SIGTERM (or SIGINT) to any process stops all of them after the same
step with a checkpoint; a dead or missing peer stops the others within the heartbeat /
initialization timeout, and rerunning the same command resumes.
"""

from __future__ import annotations

import os
import signal
import sys
import threading

# XLA's CPU thread pool must be larger than the local device count, or in-process
# collectives over several (simulated) CPU devices deadlock; set it before JAX starts
# (the config file, parsed with the flags, already imports JAX).
os.environ.setdefault(
    "NPROC", str(max(2 * int(os.environ.get("JAX_NUM_CPU_DEVICES") or 1), os.cpu_count() or 1)))

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file (a Python file with get_config()).",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", "runs/default",
                               "Output directory (checkpoints, metrics, summary).")
_COORDINATOR = flags.DEFINE_string(
    "coordinator", None, "Multi-host: HOST:PORT of process 0's jax.distributed "
    "coordination service (with --num_processes and --process_id).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None,
                                      "Multi-host: number of processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None,
                                   "Multi-host: this process's index in [0, num_processes).")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:  # orbax logs every save at INFO
    logging.set_verbosity(logging.WARNING)
  from coltrain import distributed as dist
  from coltrain.config import ConfigError  # after flag parsing: keep --help fast

  # Join the process group (if any) before anything touches a JAX backend.
  try:
    group = dist.detect(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    if group is not None:
      dist.initialize(group)
  except dist.DistributedError as e:
    dist.fatal(f"coltrain: {e}", 1)
  from coltrain.train import train_and_evaluate

  stop = threading.Event()
  received: list[int] = []

  def on_signal(signum, frame):
    del frame
    if received:  # second signal: give up immediately
      if group is not None:
        dist.fatal(f"coltrain: got signal {signum} again; aborting", 128 + signum)
      sys.exit(128 + signum)
    received.append(signum)
    print(f"\ncoltrain: got signal {signum}; saving a checkpoint after this step "
          f"(signal again to abort without saving)", file=sys.stderr, flush=True)
    stop.set()
    if group is not None and signum != signal.SIGTERM:
      # jax.distributed's preemption notifier owns SIGTERM and tells every process to
      # stop after the same step: hand the request over to it.
      os.kill(os.getpid(), signal.SIGTERM)

  signal.signal(signal.SIGINT, on_signal)
  if group is None:  # multi-process: SIGTERM stays with jax's preemption sync manager
    signal.signal(signal.SIGTERM, on_signal)
  try:
    summary = train_and_evaluate(_CONFIG.value, _WORKDIR.value, stop=stop)
  except ConfigError as e:
    if group is not None:
      dist.fatal(f"coltrain: {e}", 2)
    print(f"coltrain: {e}", file=sys.stderr)
    return 2
  except Exception as e:  # pylint: disable=broad-except
    if group is None:
      raise
    import traceback
    traceback.print_exc()
    dist.fatal(dist.describe_failure(e), 1)
  if summary.get("interrupted"):
    return 128 + (received[0] if received else signal.SIGTERM)
  import jax
  if jax.process_index() == 0:
    print(f"coltrain: test_accuracy={summary['test_accuracy']:.4f} "
          f"test_loss={summary['test_loss']:.4f} steps={summary['steps']} "
          f"wall_seconds={summary['wall_seconds']:.1f} "
          f"train_steps_per_second={summary['train_steps_per_second']:.1f} "
          f"params_fingerprint={summary['params_fingerprint'][:16]}...", flush=True)
  return 0


def parse_flags(argv: list[str]) -> list[str]:
  """absl flag parsing, with unknown `--config.KEY` overrides reported clearly."""
  from launch.cli import flags_parser
  from coltrain.config import unknown_override_keys
  return flags_parser("coltrain", unknown_override_keys)(argv)


if __name__ == "__main__":
  flags.mark_flags_as_required(["config"])
  app.run(main, flags_parser=parse_flags)
