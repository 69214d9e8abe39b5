"""OCP MX floating-point quantize-dequantize on blocked data (contract §3), integer-exact.

Works on the blocked layout of `blocking.to_blocks`: float32 `xb` (..., nblocks, block).
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from coltrain.numerics import bits as _bits
from coltrain.numerics.blocking import block_max
from coltrain.numerics.formats import MXFormat
from coltrain.numerics.rounding import round_shift


def quantize_blocked(xb: jax.Array, fmt: MXFormat, rounding: str,
                     random_bits: Optional[jax.Array] = None) -> jax.Array:
  """MX quantize-dequantize of float32 blocks xb (..., nblocks, b) -> float32, same shape.

  Per block, with biased exponents e and E = emax - 127 = floor(log2(amax)):
    scale exponent S = clip(E - emax_elem, -127, 127) (E8M0),
    y = x / 2^S has exponent e_y = (e - 127) - S <= emax_elem,
    its grid spacing is 2^g with g = max(e_y, emin_elem) - man_bits (subnormals below
    emin_elem), so |y| / 2^g = sig / 2^sh with sh = g + S + 23 - (e - 127) >= 24 - p.
  The rounded integer n (n * 2^g may reach the next binade, which is representable) is
  saturated at max_norm = max_norm_units * 2^top_shift, which only the top binade
  (g == top_shift) can exceed. Result n * 2^(g + S) rounded to float32 (FTZ only).
  """
  neg, e, sig = _bits.fields(_bits.f32_to_bits(xb))
  emax = block_max(e, keepdims=True)
  nonfinite = emax == 255
  scale = jnp.clip(emax - 127 - fmt.emax_elem, -127, 127)
  ex = e - 127
  g = jnp.maximum(ex - scale, fmt.emin_elem) - fmt.man_bits
  sh = g + scale + 23 - ex
  n = round_shift(sig, sh, rounding, random_bits)
  n = jnp.where((g >= fmt.top_shift) & (n > fmt.max_norm_units), fmt.max_norm_units, n)
  val = _bits.int_to_f32_scaled(jnp.where(neg, -n, n), g + scale)
  # All-zero blocks need no case: every sig is 0, so every n is 0.
  return jnp.where(nonfinite, jnp.float32(jnp.nan), val)
