"""Serve a model over HTTP (KServe v2) while training it in the idle cycles.

  python -m launch.serve --config configs/serve.py [--config.serve.KEY=VALUE ...] \
      [--port_file PATH]

Prints `coltrain-serve: listening on http://HOST:PORT` once ready (and writes the port
to --port_file, for scripts). SIGINT/SIGTERM stop it cleanly (exit 0). Several replicas
(`--config.serve.replicas=R`) need R local devices: on CPU set JAX_NUM_CPU_DEVICES=R
(NPROC, XLA's CPU thread pool, is then set to at least twice that unless given). With
`--config.serve.device_cpus=LIST` on the command line NPROC defaults to the number of
reserved cores; with one, XLA runs every computation on its calling thread
(`coltrain.cpus.XLA_ONE_CORE_FLAG`, added to XLA_FLAGS unless they set it).
"""

from __future__ import annotations

import gc
import os
import signal
import sys
import threading


def _default_nproc(argv: list[str]) -> int:
  """XLA's CPU thread pool size (NPROC; read once, when JAX starts, so before flags are
  parsed): one thread per reserved device core with `--config.serve.device_cpus=...` on
  the command line (more threads than cores only queue on them and stretch the tail),
  else at least twice the local device count (collectives) and every core."""
  devices = int(os.environ.get("JAX_NUM_CPU_DEVICES") or 1)
  for i, arg in enumerate(argv):
    value = None
    if arg.startswith("--config.serve.device_cpus="):
      value = arg.split("=", 1)[1]
    elif arg == "--config.serve.device_cpus" and i + 1 < len(argv):
      value = argv[i + 1]
    if value:
      from coltrain.cpus import parse_cpu_list
      try:
        return max(len(parse_cpu_list(value)), 2 * devices if devices > 1 else 1)
      except ValueError:
        break   # the config check reports it
  return max(2 * devices, os.cpu_count() or 1)


os.environ.setdefault("NPROC", str(_default_nproc(sys.argv)))

from coltrain.cpus import set_one_core_xla_flags  # noqa: E402

set_one_core_xla_flags()   # (reads NPROC, set just above)

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Serving config file (a Python file with get_config()).",
    lock_config=False)
_PORT_FILE = flags.DEFINE_string("port_file", None,
                                 "Write the bound port here once the server is ready.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  import jax
  from coltrain.config import ConfigError
  from coltrain.serve import Server

  # On the CPU backend, run each computation on the thread that calls it. The scheduler
  # thread waits for every batch and training chunk anyway; asynchronous dispatch hands
  # each one to an XLA thread on the same core and back (10-12 us a call). Measured at
  # 2,450 req/s, three interleaved pairs: D trained 1,126-1,247 vs 1,030-1,187
  # samples/s, B 1,928-2,050 vs 1,838-1,958, with the same SLO attainment. (Other
  # backends ignore this flag.)
  jax.config.update("jax_cpu_enable_async_dispatch", False)
  try:
    server = Server(_CONFIG.value)
  except ConfigError as e:
    print(f"coltrain-serve: {e}", file=sys.stderr)
    return 2
  stop = threading.Event()

  def on_signal(signum, frame):
    del signum, frame
    stop.set()

  signal.signal(signal.SIGINT, on_signal)
  signal.signal(signal.SIGTERM, on_signal)
  # Hand the GIL over every 0.5 ms (default 5 ms): a scheduler thread must not wait
  # behind the control or input threads (or another scheduler) for whole switch
  # intervals on the latency path.
  sys.setswitchinterval(0.0005)
  server.start()
  # Everything built so far (JAX, flax, the compiled executables) lives as long as the
  # process: move it out of the collector's sight, so that a full collection on the
  # latency path scans only what was allocated since (milliseconds less of pause).
  gc.collect()
  gc.freeze()
  if _PORT_FILE.value:
    tmp = _PORT_FILE.value + ".tmp"
    with open(tmp, "w") as f:
      f.write(str(server.port))
    os.replace(tmp, _PORT_FILE.value)
  print(f"coltrain-serve: listening on {server.url}", file=sys.stderr, flush=True)
  while not stop.wait(0.5):
    pass
  server.stop()
  status = server.training_status()
  if status.get("failure"):
    print(f"coltrain-serve: training failed: {status['failure']}", file=sys.stderr)
  print("coltrain-serve: stopped", file=sys.stderr, flush=True)
  return 0


def parse_flags(argv: list[str]) -> list[str]:
  """absl flag parsing, with unknown `--config.KEY` overrides reported clearly."""
  from launch.cli import flags_parser
  from coltrain.serve.config import unknown_serve_override_keys
  return flags_parser("coltrain-serve", unknown_serve_override_keys)(argv)


if __name__ == "__main__":
  flags.mark_flags_as_required(["config"])
  app.run(main, flags_parser=parse_flags)
