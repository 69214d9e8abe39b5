"""Default experiment: LeNet on the embedded MNIST-5k (4,000 train / 1,000 test digits).

Reaches >= 0.97 test accuracy in about a minute on 2 CPU cores.
Run: python -m launch.train --config configs/default.py --workdir runs/default
"""

from coltrain.config import base_config


def get_config():
  config = base_config()
  config.dataset = "mnist5k"
  config.model = "lenet"
  config.steps = 1500
  config.batch_size = 64
  config.eval_every = 500
  config.checkpoint_every = 500
  config.optimizer.name = "sgd"
  config.optimizer.learning_rate = 0.05
  config.optimizer.schedule = "warmup_cosine"
  config.optimizer.warmup_steps = 50
  return config
