"""Exact float32 helpers built on the integer bit pattern (contract §0).

Everything here works on the IEEE-754 binary32 bit fields through
`lax.bitcast_convert_type`, never on float arithmetic, so results do not depend on
whether the backend flushes subnormals (XLA CPU does inside compiled code) and no
log2/ldexp/frexp rounding can creep in.

Field names: for bits u, sign = u >> 31, biased exponent e = (u >> 23) & 0xff,
fraction f = u & 0x7fffff. A normal number is (-1)^sign * (2^23 + f) * 2^(e - 150).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

# uint32 constants (a Python int above 2^31 - 1 would not fit JAX's default int32).
SIGN_MASK = np.uint32(0x80000000)
EXP_MASK = np.uint32(0x7F800000)
FRAC_MASK = np.uint32(0x007FFFFF)
INF_BITS = np.uint32(0x7F800000)
HIDDEN_BIT = 0x00800000  # used on int32 significands


def f32_to_bits(x: jax.Array) -> jax.Array:
  """float32 -> uint32 bit pattern (no arithmetic, subnormals and NaN payloads kept)."""
  return lax.bitcast_convert_type(x, jnp.uint32)


def bits_to_f32(u: jax.Array) -> jax.Array:
  """uint32 bit pattern -> float32."""
  return lax.bitcast_convert_type(u.astype(jnp.uint32), jnp.float32)


def fields(u: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """uint32 bits -> (negative: bool, biased exponent: int32 in [0, 255], significand: int32).

  The significand is 2^23 + fraction for normal numbers and 0 when the biased exponent
  is 0 (zero or subnormal: DAZ). For inf/NaN (exponent 255) it is meaningless.
  """
  neg = (u >> np.uint32(31)) != 0
  e = ((u >> np.uint32(23)) & np.uint32(0xFF)).astype(jnp.int32)
  frac = (u & FRAC_MASK).astype(jnp.int32)
  sig = jnp.where(e == 0, 0, frac | HIDDEN_BIT)
  return neg, e, sig


def daz(x: jax.Array) -> jax.Array:
  """Replaces float32 subnormals by a zero of the same sign; everything else unchanged."""
  u = f32_to_bits(x)
  return bits_to_f32(jnp.where((u & EXP_MASK) == 0, u & SIGN_MASK, u))


def ftz(x: jax.Array) -> jax.Array:
  """FTZ on float32 values: magnitude below 2^-126 (subnormal) -> zero of the same sign."""
  return daz(x)


def scale_pow2(x: jax.Array, k: jax.Array) -> jax.Array:
  """Exactly x * 2^k for float32 x that is zero or normal, and int32 k of any size.

  The result is the exact product rounded to float32 per contract §0: since x already has
  24 significant bits no rounding occurs; a result below 2^-126 is flushed to a zero of
  x's sign (FTZ) and one at or above 2^128 becomes ±inf. Works for |k| far beyond the
  float32 exponent range (no intermediate float power of two is formed).
  """
  u = f32_to_bits(x)
  sign = u & SIGN_MASK
  e = ((u >> np.uint32(23)) & np.uint32(0xFF)).astype(jnp.int32)
  ne = e + k.astype(jnp.int32)
  new_exp = jnp.clip(ne, 1, 254).astype(jnp.uint32) << np.uint32(23)
  scaled = (u & (SIGN_MASK | FRAC_MASK)) | new_exp
  out = jnp.where(ne >= 255, sign | INF_BITS, jnp.where(ne <= 0, sign, scaled))
  return bits_to_f32(jnp.where(e == 0, sign, out))


def int_to_f32_scaled(n: jax.Array, k: jax.Array) -> jax.Array:
  """Integer n (int32, any value) times 2^k, rounded once to float32 per contract §0.

  The int32 -> float32 conversion rounds to nearest-even at 24 bits (exact when
  |n| < 2^24), which is the unbounded-exponent rounding of §0; the power-of-two scaling
  that follows is exact apart from FTZ/overflow, so the result is round(n * 2^k).
  """
  return scale_pow2(n.astype(jnp.float32), k)
