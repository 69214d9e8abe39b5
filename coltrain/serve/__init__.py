"""Co-located inference and training: an SLO-aware KServe v2 server whose device
schedulers run inference first and train the served model in the idle cycles.

  config.py     the `serve` config group and its validation
  protocol.py   KServe v2 JSON request parsing / responses
  model.py      published weight versions, precompiled per-bucket predict executables
  trainer.py    chunked training with coltrain.train's step (gradient accumulation)
  timing.py     online duration estimates
  scheduler.py  one thread per device: batching, deadlines, training in the slack
  router.py     admission control (shedding) and least-expected-completion routing
  metrics.py    Prometheus metrics
  frontend.py   the HTTP endpoints (ASGI on uvicorn), front-end backlog estimate
  server.py     `Server`, assembling all of the above from a config
"""

from coltrain.serve.config import SERVE_DEFAULTS, validate_serve, with_serve_defaults
from coltrain.serve.protocol import InferRequest, ProtocolError, parse_infer_request
from coltrain.serve.server import Server

__all__ = ["Server", "SERVE_DEFAULTS", "validate_serve", "with_serve_defaults",
           "parse_infer_request", "InferRequest", "ProtocolError"]
