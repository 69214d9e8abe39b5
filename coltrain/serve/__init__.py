"""Co-located inference and training: an SLO-aware KServe v2 server whose device
schedulers run inference first and train the served model in the idle cycles.

  config.py     the `serve` config group and its validation
  protocol.py   KServe v2 JSON request parsing / responses
  buckets.py    the batch sizes a batch is padded to (one executable each)
  model.py      published weight versions, precompiled per-bucket predict executables
  trainer.py    chunked training with coltrain.train's step (gradient accumulation)
  timing.py     online duration estimates
  scheduler.py  one thread per device: batching, deadlines, training in the slack
  router.py     admission control (shedding) and least-expected-completion routing
  metrics.py    Prometheus metrics
  http.py       a small HTTP/1.1 server (asyncio + httptools)
  wire.py       the messages between the front-end and the device process
  frontend.py   the front-end process: HTTP endpoints, request parsing, backlog estimate
  bridge.py     the device process's side: starts the front end, serves its messages
  server.py     `Server`, assembling all of the above from a config

The names below are imported on first use, so the front-end process, which imports
`coltrain.serve.frontend`, never loads JAX.
"""

import importlib

_EXPORTS = {"Server": "server", "SERVE_DEFAULTS": "config", "validate_serve": "config",
            "with_serve_defaults": "config", "parse_infer_request": "protocol",
            "InferRequest": "protocol", "ProtocolError": "protocol"}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
  if name in _EXPORTS:
    return getattr(importlib.import_module(f"coltrain.serve.{_EXPORTS[name]}"), name)
  raise AttributeError(f"module 'coltrain.serve' has no attribute {name!r}")
