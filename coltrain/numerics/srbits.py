"""Random bits for stochastic rounding inside HBFP training steps.

`hash_bits(key, shape)` gives uint32 bits like `jax.random.bits(key, shape, uint32)` but
from a counter-based integer hash instead of threefry (which is ~25x slower on CPU and
dominated the cost of stochastic rounding of large gradients):

  (s0, s1) = jax.random.bits(key, (2,), uint32)
  bits[i]  = mix(mix(i ^ s0) + s1)          i = row-major element index (uint32)
  mix(x)   = Chris Wellons' "lowbias32": x ^= x >> 16; x *= 0x7feb352d;
             x ^= x >> 15; x *= 0x846ca68b; x ^= x >> 16

mix is a bijection of uint32, so for one key the bits of distinct elements are distinct
(a draw without replacement from 2^32 values, indistinguishable from iid at these sizes),
and the seeds come from the key through threefry, so keys from `fold_in` (per step,
layer, role, operand) give independent streams. Stochastic rounding uses the top 24 bits.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax


def _mix(x):
  x = x ^ (x >> np.uint32(16))
  x = x * np.uint32(0x7FEB352D)
  x = x ^ (x >> np.uint32(15))
  x = x * np.uint32(0x846CA68B)
  return x ^ (x >> np.uint32(16))


def hash_bits(key, shape) -> jax.Array:
  """uint32 array of `shape` derived from `key` (see module doc)."""
  shape = tuple(int(d) for d in shape)
  n = math.prod(shape)
  if n >= 2**32:
    raise ValueError(f"hash_bits supports fewer than 2^32 elements, got shape {shape}")
  seeds = jax.random.bits(key, (2,), jnp.uint32)
  idx = lax.iota(jnp.uint32, n).reshape(shape)
  return _mix(_mix(idx ^ seeds[0]) + seeds[1])
