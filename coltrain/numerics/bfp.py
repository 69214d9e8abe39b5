"""Block floating point encode/decode on blocked data (contract §2), integer-exact.

Works on the blocked layout of `blocking.to_blocks`: float32 `xb` of shape
(..., nblocks, block). The public, axis-aware wrappers live in `quantize.py`.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp

from coltrain.numerics import bits as _bits
from coltrain.numerics.blocking import block_max
from coltrain.numerics.formats import BFPFormat
from coltrain.numerics.rounding import round_shift


class BFPBlocks(NamedTuple):
  """Integer encoding of a bfp(m, b) tensor (a pytree, so it passes through jit/vmap).

  Layout: the block axis of the original tensor is moved last (other axes keep their
  order), zero-padded to a multiple of b and split, so for an input whose non-block axes
  are `...`:

  - mantissas: int32 (..., nblocks, b). Sign-magnitude value q in [-qmax, qmax],
    qmax = 2^(m-1) - 1, stored as an ordinary int32, so `mantissas.astype(int8)` (m <= 8)
    or `.astype(int16)` (m <= 16) is lossless. Padding positions hold 0.
  - exponents: int32 (..., nblocks). Shared exponent E = floor(log2(amax)), in
    [-126, 127] for a finite non-zero block; 0 for an all-zero block and for a
    non-finite block. It fits one signed byte (int8); -128 is never used, so a packer may
    use it as a NaN-block sentinel.
  - nonfinite: bool (..., nblocks). True iff the block held a NaN or ±inf; then all its
    mantissas are 0 and every element decodes to NaN.

  Element i of a finite block decodes to q_i * 2^(E - (m - 2)) rounded to float32 (§0;
  only FTZ can apply).
  """

  mantissas: jax.Array
  exponents: jax.Array
  nonfinite: jax.Array


def mantissa_dtype(fmt: BFPFormat):
  """int8 (m <= 8), int16 (m <= 16) or int32: the narrowest integer dtype that holds the
  mantissas of `fmt` (the bfp wire format's mantissa dtype)."""
  return {8: jnp.int8, 16: jnp.int16, 32: jnp.int32}[fmt.storage_bits]


def encode_blocked(xb: jax.Array, fmt: BFPFormat, rounding: str,
                   random_bits: Optional[jax.Array] = None) -> BFPBlocks:
  """bfp-encodes float32 blocks xb (..., nblocks, b); random_bits uint32 like xb."""
  m = fmt.mantissa_bits
  neg, e, sig = _bits.fields(_bits.f32_to_bits(xb))  # sig = 0 for zeros/subnormals (DAZ)
  emax = block_max(e)  # biased exponent of amax; 0: all zero; 255: non-finite
  nonfinite = emax == 255
  special = nonfinite | (emax == 0)
  # |x| = sig * 2^(e - 150) and the step is 2^(E - (m - 2)) with E = emax - 127, so
  # |y| = |x| / step = sig / 2^sh. sh >= 25 - m >= 1 because e <= emax.
  sh = emax[..., None] - e + (25 - m)
  n = jnp.minimum(round_shift(sig, sh, rounding, random_bits), fmt.qmax)
  q = jnp.where(neg, -n, n)
  q = jnp.where(special[..., None], 0, q)
  exponents = jnp.where(special, 0, emax - 127)
  return BFPBlocks(q, exponents, nonfinite)


def decode_blocked(blocks: BFPBlocks, fmt: BFPFormat) -> jax.Array:
  """BFPBlocks -> float32 (..., nblocks, b): q * 2^(E - (m-2)) with FTZ; NaN blocks."""
  k = blocks.exponents[..., None] - fmt.step_shift
  val = _bits.int_to_f32_scaled(blocks.mantissas, k)
  return jnp.where(blocks.nonfinite[..., None], jnp.float32(jnp.nan), val)
