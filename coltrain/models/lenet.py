"""A LeNet-5-style CNN (conv-pool-conv-pool-dense-dense-dense) with ReLU and max pooling."""

from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp


def flax_max_pool_2x2(x: jnp.ndarray) -> jnp.ndarray:
  """`nn.max_pool(x, (2, 2), strides=(2, 2))`: the reference for `max_pool_2x2`."""
  return nn.max_pool(x, (2, 2), strides=(2, 2))


def _windows(x: jnp.ndarray) -> jnp.ndarray:
  """x (B, H, W, C) -> (B, H // 2, 2, W // 2, 2, C): the 2x2 windows (VALID: an odd last
  row or column is dropped)."""
  b, h, w, c = x.shape
  return x[:, :h - h % 2, :w - w % 2].reshape(b, h // 2, 2, w // 2, 2, c)


@jax.custom_vjp
def max_pool_2x2(x: jnp.ndarray) -> jnp.ndarray:
  """2x2 max pooling with stride 2 (VALID), x (B, H, W, C) -> (B, H // 2, W // 2, C):
  exactly `nn.max_pool(x, (2, 2), strides=(2, 2))` in values and gradient, computed
  without `select_and_scatter_add` (the gradient of `nn.max_pool`), which XLA's CPU
  backend runs slowly. The values are a max over a reshape; the gradient goes, as
  `select_and_scatter_add`'s does, to the first element of each window (row-major)
  that equals its maximum, chosen with elementwise masks (a window holding a NaN
  passes no gradient). `python -m launch.bench_pooling` times both."""
  return _window_max(x)


def _window_max(x: jnp.ndarray) -> jnp.ndarray:
  return _windows(x).max(axis=(2, 4))


def _max_pool_2x2_fwd(x):
  y = _window_max(x)
  return y, (x, y)


def _max_pool_2x2_bwd(res, g):
  x, y = res
  win = _windows(x)
  taken = jnp.zeros(y.shape, bool)
  parts = {}
  for i in (0, 1):           # row-major: the first maximum of a window takes it all
    for j in (0, 1):
      hit = (win[:, :, i, :, j] == y) & ~taken
      taken = taken | hit
      parts[i, j] = jnp.where(hit, g, jnp.zeros_like(g))
  rows = [jnp.stack([parts[i, 0], parts[i, 1]], axis=3) for i in (0, 1)]
  dx = jnp.stack(rows, axis=2)                         # (B, H/2, 2, W/2, 2, C)
  b, h, w, c = x.shape
  dx = dx.reshape(b, h - h % 2, w - w % 2, c)
  return (jnp.pad(dx, ((0, 0), (0, h % 2), (0, w % 2), (0, 0))),)


max_pool_2x2.defvjp(_max_pool_2x2_fwd, _max_pool_2x2_bwd)


class LeNet(nn.Module):
  """x (B, H, W, C) float32 -> logits (B, num_classes). `pool`: the 2x2 max pooling
  (`max_pool_2x2`, or `flax_max_pool_2x2`: the same values and gradients)."""
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
