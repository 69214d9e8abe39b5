"""Block floating point matrix multiply: the exact HBFP datapath (contract §5) and the
fake-quantized fast path.

`matmul(a, b, lhs=..., rhs=..., datapath="exact")` is bit-exact to contract §5:

  1. both operands are bfp-encoded along K (a along its last axis, b along axis 0) with
     the same block boundaries;
  2. each block product P_k = sum_t qa[i, t] * qb[t, j] is an exact integer (computed by
     an integer-exact dot_general per block: int8 x int8 -> int32 when both formats have
     m <= 8, float32 when every partial sum is an integer below 2^24 (then any summation
     order is exact), int32 otherwise);
  3. v_k = P_k * 2^(Ea + Eb - (ma - 2) - (mb - 2)) rounded once to float32 (the int32 ->
     float32 conversion rounds to nearest even at 24 bits, the power-of-two scaling is
     done on the exponent bits, with FTZ and overflow to inf); NaN where either block is
     non-finite;
  4. acc = +0; acc = FTZ(acc + v_k) for k = 0 .. nb-1 in order, in float32.
  Steps 2-4 run as one `lax.scan` over the blocks, so only one (M, N) block product is
  live at a time. FTZ is applied explicitly on the bits (it does not rely on XLA CPU's
  flush-to-zero mode, although that gives the same result).

`datapath="fake"` quantize-dequantizes both operands along K and does an ordinary float32
matmul (precision HIGHEST). It uses the same quantized values but its accumulation order
is XLA's, so it is NOT the §5 datapath and never bit-exact to it.

Neither path is differentiable (gradients through the quantizers are zero); training code
defines its own VJPs (contract §6: the backward GEMMs are quantized GEMMs of their own).
"""

from __future__ import annotations

import functools
import math
from typing import Optional, Sequence, Union

import jax
import jax.numpy as jnp
from jax import lax

from coltrain.numerics import bfp as _bfp
from coltrain.numerics import bits as _bits
from coltrain.numerics.blocking import to_blocks
from coltrain.numerics.formats import BFPFormat, Format, parse_format
from coltrain.numerics.quantize import as_float32, quantize
from coltrain.numerics.rounding import check_rounding

DATAPATHS = ("exact", "fake")
BACKENDS = ("jax", "hw")


def check_exact_config(lhs: BFPFormat, rhs: BFPFormat) -> None:
  """Raises ValueError unless (lhs, rhs) is a valid configuration of the §5 datapath."""
  for side, f in (("lhs", lhs), ("rhs", rhs)):
    if not isinstance(f, BFPFormat):
      raise ValueError(f"datapath='exact' needs bfp formats (bfp{{m}}_b{{block}} or "
                       f"mxint8); {side} is {f}")
  if lhs.block_size != rhs.block_size:
    raise ValueError(f"datapath='exact' needs the same block size on both operands (same "
                     f"block boundaries along K); got {lhs} and {rhs}")
  bound = lhs.block_size * lhs.qmax * rhs.qmax
  if bound >= 2**31:
    raise ValueError(
        f"exact block products of {lhs} x {rhs} can reach block*qmax_lhs*qmax_rhs = "
        f"{lhs.block_size}*{lhs.qmax}*{rhs.qmax} = {bound} >= 2^31, which overflows the "
        f"int32 block accumulator; use fewer mantissa bits or a smaller block")


def _operand_dtype(lhs: BFPFormat, rhs: BFPFormat):
  """dtype in which the mantissas enter the block dot products (see `_block_product`)."""
  if lhs.storage_bits == 8 and rhs.storage_bits == 8:
    return jnp.int8
  if lhs.block_size * lhs.qmax * rhs.qmax < 2**24:
    return jnp.float32
  return jnp.int32


def _block_product(qa: jax.Array, qb: jax.Array) -> jax.Array:
  """Exact P[i, j] = sum_t qa[i, t] * qb[j, t] for one block; qa (M, b), qb (N, b).

  int8 operands: int8 x int8 -> int32 dot. float32 operands (only chosen when
  b * qmax_a * qmax_b < 2^24): every partial sum, in any order, is an integer below 2^24,
  so the float32 dot is exact. int32 operands: int32 dot (exact below 2^31, which
  `check_exact_config` guarantees).
  """
  dims = (((1,), (1,)), ((), ()))
  if qa.dtype == jnp.float32:
    return lax.dot_general(qa, qb, dims, precision=lax.Precision.HIGHEST,
                           preferred_element_type=jnp.float32)
  return lax.dot_general(qa, qb, dims, preferred_element_type=jnp.int32)


@functools.partial(jax.jit, static_argnames=("lhs", "rhs", "rounding"))
def _exact_jit(a, b, bits_a, bits_b, *, lhs, rhs, rounding):
  k_len = a.shape[-1]
  lead = a.shape[:-1]
  if k_len == 0:  # no blocks: the accumulator stays +0
    return jnp.zeros(lead + (b.shape[1],), jnp.float32)
  bs = lhs.block_size
  rows = math.prod(lead)
  a2 = a.reshape(rows, k_len)
  ra = None if bits_a is None else to_blocks(bits_a.reshape(rows, k_len), -1, bs)
  rb = None if bits_b is None else to_blocks(bits_b, 0, bs)
  ea = _bfp.encode_blocked(to_blocks(a2, -1, bs), lhs, rounding, ra)  # (M, nb, bs)
  eb = _bfp.encode_blocked(to_blocks(b, 0, bs), rhs, rounding, rb)    # (N, nb, bs)
  dtype = _operand_dtype(lhs, rhs)
  # Scan over blocks k = 0 .. nb-1 in order (block axis leading).
  xs = (jnp.moveaxis(ea.mantissas.astype(dtype), 1, 0), ea.exponents.T, ea.nonfinite.T,
        jnp.moveaxis(eb.mantissas.astype(dtype), 1, 0), eb.exponents.T, eb.nonfinite.T)
  step_shift = lhs.step_shift + rhs.step_shift

  def block_step(acc, x):
    qa, e_a, nf_a, qb, e_b, nf_b = x
    p = _block_product(qa, qb)                                     # (M, N) exact
    shift = e_a[:, None] + e_b[None, :] - step_shift
    if p.dtype == jnp.float32:
      v = _bits.scale_pow2(p, shift)        # p exact in float32: only FTZ/overflow
    else:
      v = _bits.int_to_f32_scaled(p, shift)  # rounds once (RNE, 24 bits), FTZ/overflow
    v = jnp.where(nf_a[:, None] | nf_b[None, :], jnp.float32(jnp.nan), v)
    return _bits.ftz(acc + v), None

  # +0, built from both operands' bits so that inside shard_map the carry varies over the
  # same mesh axes as the scanned blocks (a plain jnp.zeros would not, and scan rejects it).
  zero = jnp.uint32(0)
  acc = _bits.bits_to_f32((_bits.f32_to_bits(a2[:, :1]) & zero)
                          | (_bits.f32_to_bits(b[:1, :]) & zero))  # (M, N) of +0
  # unroll=1 on purpose: on XLA CPU unrolling fuses the per-block dots badly (2-4x slower).
  acc, _ = lax.scan(block_step, acc, xs)
  return acc.reshape(lead + (b.shape[1],))


@functools.partial(jax.jit, static_argnames=("lhs", "rhs", "rounding"))
def _fake_jit(a, b, bits_a, bits_b, *, lhs, rhs, rounding):
  qa = quantize(a, lhs, axis=-1, rounding=rounding, random_bits=bits_a)
  qb = quantize(b, rhs, axis=0, rounding=rounding, random_bits=bits_b)
  return jnp.matmul(qa, qb, precision=lax.Precision.HIGHEST)


def _operand_bits(a, b, rounding, random_bits, key):
  if rounding != "stochastic":
    if random_bits is not None or key is not None:
      raise ValueError(f"random_bits/key are only used by stochastic rounding, "
                       f"not by {rounding!r}")
    return None, None
  if (random_bits is None) == (key is None):
    raise ValueError("stochastic rounding needs exactly one of random_bits=(bits_a, "
                     "bits_b) (uint32, shaped like a and b) or key (a jax PRNG key)")
  if key is not None:
    ka, kb = jax.random.split(key)
    return (jax.random.bits(ka, a.shape, jnp.uint32),
            jax.random.bits(kb, b.shape, jnp.uint32))
  if not isinstance(random_bits, (tuple, list)) or len(random_bits) != 2:
    raise ValueError("random_bits must be a pair (bits_a, bits_b)")
  out = []
  for name, bits, x in (("a", random_bits[0], a), ("b", random_bits[1], b)):
    if getattr(bits, "dtype", None) != jnp.uint32 or tuple(bits.shape) != x.shape:
      raise ValueError(f"random bits for {name} must be uint32 of shape {x.shape}, got "
                       f"{getattr(bits, 'dtype', type(bits))} "
                       f"{tuple(getattr(bits, 'shape', ()))}")
    out.append(jnp.asarray(bits))
  return tuple(out)


def matmul(a: jax.Array, b: jax.Array, *, lhs: Union[str, Format],
           rhs: Union[str, Format], datapath: str = "exact", backend: str = "jax",
           rounding: str = "nearest_even",
           random_bits: Optional[Sequence[jax.Array]] = None,
           key: Optional[jax.Array] = None, hw_plugin: Optional[str] = None) -> jax.Array:
  """C = a @ b with both operands in block formats, blocked along K.

  Args:
    a: float32 (..., M, K); leading batch dimensions are independent.
    b: float32 (K, N).
    lhs, rhs: formats of a and b (names or Format objects). datapath="exact" needs bfp
      formats (or mxint8) with the same block size and block*qmax_lhs*qmax_rhs < 2^31;
      "fake" accepts any format, including "fp32".
    datapath: "exact" (contract §5, bit-exact) or "fake" (quantize-dequantize, then a
      float32 matmul at HIGHEST precision; not bit-exact to §5).
    backend: "jax" (pure JAX, runs anywhere) or "hw": the exact datapath as one XLA
      custom call to a hardware plugin (`coltrain.numerics.hw`; bit-identical to "jax";
      datapath "exact" only).
    rounding: quantization rounding of both operands (§4).
    random_bits: for stochastic: (bits_a, bits_b), uint32 shaped like a and b.
    key: for stochastic, instead: a PRNG key, split in two for a and b.
    hw_plugin: backend "hw": the plugin library (default: $COLTRAIN_HW_PLUGIN or the
      built-in CPU datapath model). Formats/shapes it cannot do raise ValueError.

  Returns:
    float32 (..., M, N).

  Raises:
    ValueError: bad shapes/dtypes, formats, datapath, backend, rounding or random bits,
      and exact configurations whose block products could overflow int32.
  """
  if datapath not in DATAPATHS:
    raise ValueError(f"unknown datapath {datapath!r}; expected 'exact' (contract §5) or "
                     f"'fake' (quantize-dequantize + float32 matmul)")
  if backend not in BACKENDS:
    raise ValueError(f"unknown matmul backend {backend!r}; expected 'jax' (pure JAX) or "
                     f"'hw' (a hardware plugin's custom call, coltrain.numerics.hw)")
  if backend == "hw" and datapath != "exact":
    raise ValueError("backend='hw' runs the exact datapath (contract §5); the fake "
                     "quantize-dequantize path exists only in JAX: use datapath='exact' or "
                     "backend='jax'")
  check_rounding(rounding)
  lhs, rhs = parse_format(lhs), parse_format(rhs)
  a, b = as_float32(a, "a"), as_float32(b, "b")
  if a.ndim < 2 or b.ndim != 2:
    raise ValueError(f"matmul needs a of shape (..., M, K) and b of shape (K, N); got "
                     f"{a.shape} and {b.shape}")
  if a.shape[-1] != b.shape[0]:
    raise ValueError(f"contraction sizes differ: a {a.shape} vs b {b.shape}")
  bits_a, bits_b = _operand_bits(a, b, rounding, random_bits, key)
  if datapath == "fake":
    return _fake_jit(a, b, bits_a, bits_b, lhs=lhs, rhs=rhs, rounding=rounding)
  check_exact_config(lhs, rhs)
  if backend == "hw":
    return _exact_hw(a, b, bits_a, bits_b, lhs, rhs, rounding, hw_plugin)
  return _exact_jit(a, b, bits_a, bits_b, lhs=lhs, rhs=rhs, rounding=rounding)


def _exact_hw(a, b, bits_a, bits_b, lhs, rhs, rounding, hw_plugin):
  """The exact datapath as the plugin's "gemm" custom call; a's leading dims become rows."""
  from coltrain.numerics.hw import ops as hw_ops  # loads the plugin library on first use
  lead, k = a.shape[:-1], a.shape[-1]
  rows = a.reshape(math.prod(lead), k)
  bits_rows = None if bits_a is None else bits_a.reshape(rows.shape)
  c = hw_ops.gemm(rows, b, lhs, rhs, rounding=rounding, bits_a=bits_rows, bits_b=bits_b,
                  plugin=hw_plugin)
  return c.reshape(lead + (b.shape[1],))
