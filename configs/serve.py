"""Default serving config: the default experiment (LeNet on MNIST-5k, configs/default.py)
served over HTTP while it keeps training in idle cycles.

Run: python -m launch.serve --config configs/serve.py [--config.serve.slo_ms=20]
The `serve.*` keys are listed in coltrain/serve/config.py and the README.
"""

from coltrain.serve.config import with_serve_defaults
from configs.default import get_config as default_config


def get_config():
  config = with_serve_defaults(default_config())
  config.steps = 100_000        # a long-running server keeps training
  config.optimizer.schedule = "constant"
  config.optimizer.learning_rate = 0.02
  return config
