"""Fast fake quantization for the HBFP training path: the same values as
`coltrain.numerics.quantize.quantize`, bit for bit, but cheaper inside a train step.

Two differences from `quantize`, neither visible in the result:
  - the block axis stays where it is (the tensor is reshaped to (..., nblocks, b, ...)
    and reduced over the b axis), so quantizing along a leading axis (the batch/position
    axis of the `drhs` GEMMs) does not transpose the tensor;
  - bfp formats use a shorter float formulation of contract §2: the block exponent is
    the max of the biased exponent fields; |x| · 2^(m-2-E) and q · 2^(E-(m-2)) are formed
    by adding to the exponent field (exact; results below 2^-126 are zero, which is what
    the contract gives: such a |y| rounds to 0 in every mode, and decoded values there
    are flushed, FTZ); nearest_even is `lax.round` to even (y < 2^23, exact); stochastic
    compares δ·2^24 >= 2^24 - r in float32 (both sides exact, as §4 notes).
MX formats are delegated to `quantize` (with the axis moved; correct, not faster).
Equality with `quantize` is tested on random and adversarial inputs (tests/test_hybrid_*).
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from coltrain.numerics.blocking import normalize_axis
from coltrain.numerics.formats import Format
from coltrain.numerics.quantize import quantize

_MAG = np.int32(0x7FFFFFFF)
_SIGN = np.int32(-0x80000000)


def fake_quantize(x: jax.Array, fmt: Format, axis: int, rounding: str = "nearest_even",
                  random_bits: Optional[jax.Array] = None) -> jax.Array:
  """quantize(x, fmt, axis=axis, rounding=rounding, random_bits=random_bits), faster.

  x: float32; fmt: a Format object; random_bits: uint32 of x's shape for stochastic.
  fp32 applies DAZ like `quantize`.
  """
  axis = normalize_axis(axis, x.ndim)
  if fmt.kind != "bfp" or rounding not in ("nearest_even", "stochastic"):
    return quantize(x, fmt, axis=axis, rounding=rounding, random_bits=random_bits)
  if rounding == "stochastic" and random_bits is None:
    raise ValueError("stochastic rounding needs random bits")
  b = fmt.block_size
  length = x.shape[axis]
  full = (length // b) * b
  if full == length or full == 0:      # whole blocks, or one short block
    return _bfp_blocks(x, fmt, axis, min(b, length), rounding, random_bits)
  # A short last block: quantize it on its own (no padding copies) and concatenate.
  sl = lambda a, lo, hi: None if a is None else lax.slice_in_dim(a, lo, hi, axis=axis)
  head = _bfp_blocks(sl(x, 0, full), fmt, axis, b, rounding, sl(random_bits, 0, full))
  tail = _bfp_blocks(sl(x, full, length), fmt, axis, length - full, rounding,
                     sl(random_bits, full, length))
  return jnp.concatenate([head, tail], axis=axis)


def _bfp_blocks(x, fmt, axis: int, b: int, rounding: str, random_bits):
  """bfp quantization of x whose length along `axis` is a multiple of the block b."""
  m = fmt.mantissa_bits
  nb = x.shape[axis] // b
  shape = x.shape[:axis] + (nb, b) + x.shape[axis + 1:]
  u = lax.bitcast_convert_type(x, jnp.int32).reshape(shape)
  mag = u & _MAG
  e = mag >> 23                                             # biased exponent field
  # Block max of |x| as a float reduce (XLA CPU splits integer reduces over a minor
  # axis into a slow reduce-window). NaN does not reliably propagate through a
  # vectorized float max, so NaN/inf enter as +inf (exponent field 255 either way).
  a = lax.bitcast_convert_type(jnp.where(e == 255, np.int32(0x7F800000), mag), jnp.float32)
  amax = jnp.max(a, axis=axis + 1, keepdims=True)
  emax = lax.bitcast_convert_type(amax, jnp.int32) >> 23    # 255: non-finite block
  # y = |x| * 2^(m-2-E), E = emax - 127: add `shift` to the exponent field.
  shift = (m - 2 + 127) - emax
  ok = (e >= 1) & (e + shift >= 1)                          # DAZ; tiny y -> 0
  y = lax.bitcast_convert_type(jnp.where(ok, mag + (shift << 23), 0), jnp.float32)
  if rounding == "nearest_even":
    n = lax.round(y, lax.RoundingMethod.TO_NEAREST_EVEN)
  else:
    rb = random_bits.reshape(shape)
    r = (rb >> np.uint32(8)).astype(jnp.int32).astype(jnp.float32)
    g0 = jnp.floor(y)
    up = (y - g0) * np.float32(2.0**24) >= np.float32(2.0**24) - r
    n = g0 + up.astype(jnp.float32)
  n = jnp.minimum(n, np.float32(fmt.qmax))
  nbits = lax.bitcast_convert_type(n, jnp.int32)
  keep = (nbits != 0) & ((nbits >> 23) - shift >= 1)        # FTZ of the decoded value
  v = jnp.where(keep, nbits - (shift << 23), 0) | (u & _SIGN)
  out = lax.bitcast_convert_type(v, jnp.float32)
  out = jnp.where(emax == 255, np.float32(np.nan), out)
  return out.reshape(x.shape)
