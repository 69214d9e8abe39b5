"""A LeNet-5-style CNN (conv-pool-conv-pool-dense-dense-dense) with ReLU and max pooling."""

from typing import Callable

import flax.linen as nn
import jax.numpy as jnp


def flax_max_pool_2x2(x: jnp.ndarray) -> jnp.ndarray:
  """`nn.max_pool(x, (2, 2), strides=(2, 2))`: the reference for `max_pool_2x2`."""
  return nn.max_pool(x, (2, 2), strides=(2, 2))


def max_pool_2x2(x: jnp.ndarray) -> jnp.ndarray:
  """2x2 max pooling with stride 2 (VALID: an odd last row or column is dropped), x (B,
  H, W, C) -> (B, H // 2, W // 2, C): the values of `nn.max_pool(x, (2, 2), strides=(2,
  2))`, computed as a max over a reshape. Its gradient is `reduce_max`'s instead of
  `select_and_scatter_add`'s, which XLA's CPU backend runs slowly (LeNet's gradient of
  one image 1,135 -> 976 us, of 8 images 5,344 -> 4,047 us on one core): the same
  gradient, except where a window holds its maximum more than once, where `reduce_max`
  splits it equally among them instead of giving it all to the first (after a ReLU, a
  window of zeros passes no gradient either way). `python -m launch.bench_pooling`
  times both."""
  b, h, w, c = x.shape
  x = x[:, :h - h % 2, :w - w % 2]
  return x.reshape(b, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))


class LeNet(nn.Module):
  """x (B, H, W, C) float32 -> logits (B, num_classes). `pool`: the 2x2 max pooling
  (`max_pool_2x2`, or `flax_max_pool_2x2`: the same values)."""
  num_classes: int
  features: tuple[int, int] = (32, 64)
  hidden: tuple[int, int] = (256, 128)
  pool: Callable[[jnp.ndarray], jnp.ndarray] = max_pool_2x2

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
    del train
    x = nn.relu(nn.Conv(self.features[0], (5, 5), padding="SAME", name="conv0")(x))
    x = self.pool(x)
    x = nn.relu(nn.Conv(self.features[1], (5, 5), padding="VALID", name="conv1")(x))
    x = self.pool(x)
    x = x.reshape((x.shape[0], -1))
    x = nn.relu(nn.Dense(self.hidden[0], name="dense0")(x))
    x = nn.relu(nn.Dense(self.hidden[1], name="dense1")(x))
    return nn.Dense(self.num_classes, name="head")(x)
