"""Serving configs: an experiment config served over HTTP while it keeps training in
idle cycles.

  configs/serve.py          the default experiment (LeNet on MNIST-5k, configs/default.py)
                            with a constant learning rate of 0.02 and 100,000 steps (a
                            long-running server)
  configs/serve.py:NAME     the experiment configs/NAME.py exactly as `launch.train` runs
                            it, plus the `serve` group: the config to serve a run of it
                            (`--config.serve.init_from=WORKDIR`; raise `--config.steps`
                            to keep training past the run's end)

Run: python -m launch.serve --config configs/serve.py [--config.serve.slo_ms=20]
     python -m launch.serve --config configs/serve.py:default \\
         --config.serve.init_from=runs/default --config.steps=3000
The `serve.*` keys are listed in coltrain/serve/config.py and the README.
"""

import importlib

from coltrain.serve.config import with_serve_defaults


def get_config(experiment: str = ""):
  if experiment:
    try:
      module = importlib.import_module(f"configs.{experiment}")
    except ModuleNotFoundError:
      raise ValueError(f"configs/serve.py:{experiment}: no experiment config "
                       f"configs/{experiment}.py") from None
    return with_serve_defaults(module.get_config())
  from configs.default import get_config as default_config
  config = with_serve_defaults(default_config())
  config.steps = 100_000        # a long-running server keeps training
  config.optimizer.schedule = "constant"
  config.optimizer.learning_rate = 0.02
  return config
