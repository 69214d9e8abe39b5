"""Splitting one axis of a tensor into blocks (contract §1) and putting it back.

Blocked layout: the block axis is moved last (the other axes keep their order), padded
with zeros at the end to a multiple of the block size, and split into
(..., nblocks, block). Zero padding is invisible to every coltrain quantizer: zeros never
change a block's max, its non-finite flag or its other elements.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def normalize_axis(axis: int, ndim: int) -> int:
  """Returns axis in [0, ndim); raises ValueError for a bad axis or a 0-d input."""
  if isinstance(axis, bool) or not isinstance(axis, int):
    raise ValueError(f"axis must be an int, got {axis!r}")
  if ndim == 0:
    raise ValueError("cannot block a 0-d array: quantization needs a block axis")
  if not -ndim <= axis < ndim:
    raise ValueError(f"axis {axis} is out of range for an array of rank {ndim}")
  return axis % ndim


def num_blocks(length: int, block: int) -> int:
  return -(-length // block)


def to_blocks(x: jax.Array, axis: int, block: int, pad_value=0) -> jax.Array:
  """(..., L at `axis`, ...) -> (..., nblocks, block) with the block axis moved last."""
  axis = normalize_axis(axis, x.ndim)
  x = jnp.moveaxis(x, axis, -1)
  length = x.shape[-1]
  nb = num_blocks(length, block)
  pad = nb * block - length
  if pad:
    x = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, pad)], constant_values=pad_value)
  return x.reshape(x.shape[:-1] + (nb, block))


def from_blocks(xb: jax.Array, axis: int, length: int) -> jax.Array:
  """Inverse of `to_blocks`: (..., nblocks, block) -> original layout, padding dropped.

  `axis` is the block axis of the *result* (rank = xb.ndim - 1), `length` its size.
  """
  x = xb.reshape(xb.shape[:-2] + (xb.shape[-2] * xb.shape[-1],))[..., :length]
  return jnp.moveaxis(x, -1, normalize_axis(axis, x.ndim))


def block_max(v: jax.Array, keepdims: bool = False) -> jax.Array:
  """max over the last (within-block) axis of a non-negative integer array.

  Same result as jnp.max(v, axis=-1), restructured for speed: XLA CPU reduces rows of
  more than 32 elements an order of magnitude slower than it evaluates elementwise
  maxima, so wide blocks are first folded in halves (zero-padded to a power of two;
  zero is neutral because v >= 0) down to 16 lanes.
  """
  b = v.shape[-1]
  if b > 32:
    width = 1 << (b - 1).bit_length()
    if width != b:
      v = jnp.pad(v, [(0, 0)] * (v.ndim - 1) + [(0, width - b)])
    while v.shape[-1] > 16:
      half = v.shape[-1] // 2
      v = jnp.maximum(v[..., :half], v[..., half:])
  return jnp.max(v, axis=-1, keepdims=keepdims)
