"""Rounding modes (contract §4) as exact integer operations.

Every quantizer in coltrain reduces rounding to one primitive: given a non-negative
integer significand `sig` (< 2^24) and a right shift `sh` >= 1, round the real number
|y| = sig / 2^sh to an integer. With n0 = floor(|y|) and the remainder
rem = sig - n0 * 2^sh (so delta = rem / 2^sh):

- nearest_even: up iff rem > 2^(sh-1), or rem == 2^(sh-1) and n0 is odd.
- toward_zero:  never up.
- stochastic:   up iff delta * 2^24 >= 2^24 - r with r = random_bits >> 8. As r is an
                integer this is floor(delta * 2^24) + r >= 2^24, and
                floor(delta * 2^24) is rem << (24 - sh) for sh <= 24 and
                sig >> (sh - 24) otherwise, so the test is exact in int32.

The caller chooses the grid (integers for bfp; the element grid of a binade for MX) by
choosing `sh`.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

ROUNDING_MODES = ("nearest_even", "stochastic", "toward_zero")


def check_rounding(rounding: str) -> str:
  if rounding not in ROUNDING_MODES:
    raise ValueError(f"unknown rounding mode {rounding!r}; expected one of "
                     f"{', '.join(ROUNDING_MODES)}")
  return rounding


def resolve_random_bits(shape: tuple[int, ...], rounding: str,
                        random_bits: Optional[jax.Array], key: Optional[jax.Array]
                        ) -> Optional[jax.Array]:
  """Validates the random-bit arguments and returns uint32 bits of `shape` (or None).

  stochastic needs exactly one of `random_bits` (uint32, shape `shape`) or `key` (a JAX
  PRNG key; bits = jax.random.bits(key, shape, jnp.uint32)). The other modes take
  neither.
  """
  check_rounding(rounding)
  if rounding != "stochastic":
    if random_bits is not None or key is not None:
      raise ValueError(f"random_bits/key are only used by stochastic rounding, "
                       f"not by {rounding!r}")
    return None
  if (random_bits is None) == (key is None):
    raise ValueError("stochastic rounding needs exactly one of random_bits (uint32 array "
                     "of the input's shape) or key (a jax PRNG key)")
  if key is not None:
    return jax.random.bits(key, shape, jnp.uint32)
  dtype = getattr(random_bits, "dtype", None)
  if dtype != jnp.uint32:
    raise ValueError(f"random_bits must have dtype uint32, got {dtype}")
  if tuple(random_bits.shape) != tuple(shape):
    raise ValueError(f"random_bits shape {tuple(random_bits.shape)} must equal the "
                     f"input shape {tuple(shape)}")
  return jnp.asarray(random_bits)


def round_shift(sig: jax.Array, sh: jax.Array, rounding: str,
                random_bits: Optional[jax.Array] = None) -> jax.Array:
  """Rounds sig / 2^sh to an integer (int32) with `rounding` (see module doc).

  sig: int32 in [0, 2^24); sh: int32 >= 1 (any size); random_bits: uint32, same shape,
  required for stochastic. The result is at most 2^24 / 2^sh rounded up, so it fits.
  """
  sh_c = jnp.minimum(sh, 25)  # sig < 2^24 <= 2^(sh_c - 1): floor is 0, below half.
  n0 = sig >> sh_c
  rem = sig & ((1 << sh_c) - 1)
  if rounding == "toward_zero":
    return n0
  if rounding == "nearest_even":
    half = 1 << (sh_c - 1)
    up = (rem > half) | ((rem == half) & ((n0 & 1) == 1))
  elif rounding == "stochastic":
    if random_bits is None:
      raise ValueError("stochastic rounding needs random bits")
    r = (random_bits >> 8).astype(jnp.int32)
    frac24 = jnp.where(sh <= 24,
                       rem << jnp.clip(24 - sh, 0, 23),
                       sig >> jnp.clip(sh - 24, 1, 31))
    up = frac24 + r >= (1 << 24)
  else:
    raise ValueError(f"unknown rounding mode {rounding!r}")
  return n0 + up.astype(jnp.int32)
