"""flax models, selected by name. Models are plain flax: quantization is injected from
outside (coltrain.numerics), never written into a model.

Every model is called as `model.apply(variables, x, train=bool)` with x float32
(B, H, W, C) and returns float32 logits (B, num_classes).
"""

from typing import Callable

import flax.linen as nn

from coltrain.models.lenet import LeNet
from coltrain.models.mlp import MLP
from coltrain.models.resnet import ResNet, ResNet20

MODELS: dict[str, Callable[[int], nn.Module]] = {
    "mlp": lambda n: MLP(num_classes=n),
    "lenet": lambda n: LeNet(num_classes=n),
    "resnet20": ResNet20,
}


def get_model(name: str, num_classes: int) -> nn.Module:
  """The model called `name` (one of MODELS) with a `num_classes`-way head."""
  if name not in MODELS:
    raise ValueError(f"unknown model '{name}'; available: {', '.join(sorted(MODELS))}")
  return MODELS[name](num_classes)


__all__ = ["get_model", "MODELS", "MLP", "LeNet", "ResNet", "ResNet20"]
