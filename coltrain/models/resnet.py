"""ResNet-20 for CIFAR-style 32x32 inputs (He et al. 2016, Sec. 4.2).

Three stages of three basic blocks with 16/32/64 channels, batch norm, and 1x1
projection shortcuts where the shape changes. 0.27M parameters at 10 classes.
"""

from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp


class BasicBlock(nn.Module):
  features: int
  stride: int = 1

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
    norm = lambda name: nn.BatchNorm(use_running_average=not train, momentum=0.9,
                                     name=name)
    y = nn.Conv(self.features, (3, 3), strides=self.stride, padding="SAME",
                use_bias=False, name="conv0")(x)
    y = nn.relu(norm("bn0")(y))
    y = nn.Conv(self.features, (3, 3), padding="SAME", use_bias=False, name="conv1")(y)
    y = norm("bn1")(y)
    if x.shape != y.shape:
      x = nn.Conv(self.features, (1, 1), strides=self.stride, use_bias=False,
                  name="shortcut")(x)
      x = norm("bn_shortcut")(x)
    return nn.relu(x + y)


class ResNet(nn.Module):
  """x (B, H, W, C) float32 -> logits (B, num_classes). Uses `batch_stats`."""
  num_classes: int
  stage_sizes: Sequence[int] = (3, 3, 3)
  widths: Sequence[int] = (16, 32, 64)

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
    x = nn.Conv(self.widths[0], (3, 3), padding="SAME", use_bias=False, name="stem")(x)
    x = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.9,
                             name="bn_stem")(x))
    for s, (blocks, width) in enumerate(zip(self.stage_sizes, self.widths)):
      for b in range(blocks):
        stride = 2 if (s > 0 and b == 0) else 1
        x = BasicBlock(width, stride, name=f"stage{s}_block{b}")(x, train)
    x = jnp.mean(x, axis=(1, 2))
    return nn.Dense(self.num_classes, name="head")(x)


def ResNet20(num_classes: int) -> ResNet:
  return ResNet(num_classes=num_classes, stage_sizes=(3, 3, 3))
