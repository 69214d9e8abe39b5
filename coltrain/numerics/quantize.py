"""Public quantizers: `quantize`, `bfp_encode`, `bfp_decode` (contract §0-§4).

All functions are bit-exact implementations of the contract, pure JAX, jit- and
vmap-compatible (formats, axis and rounding are static Python values). Exponent and
rounding work is integer arithmetic on the float32 bit patterns, so eager, jitted and
vmapped calls give the same bits.

Not differentiable: the work is integer bit manipulation, so `jax.grad` through these
functions gives zeros. Training code must wrap them (e.g. a straight-through estimator
in a `jax.custom_vjp`).

Inputs: `x` must be a float32 array (float16 / bfloat16 are widened to float32 first,
which is exact); anything else raises ValueError rather than silently rounding (e.g.
float64 -> float32 is a rounding step outside the contract: cast explicitly).
"""

from __future__ import annotations

import functools
from typing import Optional, Union

import jax
import jax.numpy as jnp

from coltrain.numerics import bfp as _bfp
from coltrain.numerics import bits as _bits
from coltrain.numerics import mx as _mx
from coltrain.numerics.bfp import BFPBlocks
from coltrain.numerics.blocking import from_blocks, normalize_axis, to_blocks
from coltrain.numerics.formats import BFPFormat, Format, parse_format
from coltrain.numerics.rounding import resolve_random_bits

_WIDENABLE = (jnp.float16, jnp.bfloat16)


def as_float32(x, what: str = "x") -> jax.Array:
  """Checks that x is a float32 array (float16/bfloat16 are widened exactly)."""
  dtype = getattr(x, "dtype", None)
  if dtype is None:
    raise ValueError(f"{what} must be a float32 array, got {type(x).__name__}")
  if dtype == jnp.float32:
    return jnp.asarray(x)
  if any(dtype == d for d in _WIDENABLE):
    return jnp.asarray(x).astype(jnp.float32)
  raise ValueError(f"{what} must be float32 (float16/bfloat16 are widened exactly), got "
                   f"{dtype}; convert explicitly, e.g. x.astype(np.float32)")


@functools.partial(jax.jit, static_argnames=("fmt", "axis", "rounding"))
def _quantize_jit(x, random_bits, *, fmt, axis, rounding):
  if fmt.kind == "fp32":
    return _bits.daz(x)
  b = fmt.block_size
  xb = to_blocks(x, axis, b)
  rb = None if random_bits is None else to_blocks(random_bits, axis, b)
  if fmt.kind == "bfp":
    yb = _bfp.decode_blocked(_bfp.encode_blocked(xb, fmt, rounding, rb), fmt)
  else:
    yb = _mx.quantize_blocked(xb, fmt, rounding, rb)
  return from_blocks(yb, axis, x.shape[axis])


def quantize(x: jax.Array, fmt: Union[str, Format], *, axis: int = -1,
             rounding: str = "nearest_even", random_bits: Optional[jax.Array] = None,
             key: Optional[jax.Array] = None) -> jax.Array:
  """Quantize-dequantize x to `fmt`, blocked along `axis`; float32 of x's shape.

  Args:
    x: float32 array, rank >= 1 (see module doc for other dtypes).
    fmt: a format or its name (`parse_format`):
      - "fp32": the identity except DAZ: subnormal inputs become a zero of the same sign;
        everything else, including NaN payloads and ±inf, is returned bit for bit.
        (`axis` is still validated; rounding arguments are validated and ignored.)
      - bfp{m}_b{b} / mxint8: contract §2. mxfp*: contract §3.
    axis: the block axis. Blocks are runs of block_size consecutive elements along it;
      the last one may be shorter and behaves as if zero padded (§1).
    rounding: "nearest_even" (default), "stochastic" or "toward_zero" (§4).
    random_bits: for stochastic: uint32 array of x's shape; element i rounds up iff
      delta_i * 2^24 >= 2^24 - (random_bits_i >> 8).
    key: for stochastic, instead of random_bits: a jax PRNG key; the bits are
      jax.random.bits(key, x.shape, jnp.uint32). (Under vmap the key is not split per
      example unless you vmap over keys too.)

  Returns:
    float32 array of x's shape. Blocks holding NaN/±inf decode to NaN everywhere;
    decoded values below 2^-126 are flushed to zero (FTZ).

  Raises:
    ValueError: unknown format or rounding mode, bad axis, non-float32 x, missing or
      malformed random bits, or random bits given for a non-stochastic mode.
  """
  fmt = parse_format(fmt)
  x = as_float32(x)
  axis = normalize_axis(axis, x.ndim)
  bits = resolve_random_bits(x.shape, rounding, random_bits, key)
  if fmt.kind == "fp32":
    bits = None
  return _quantize_jit(x, bits, fmt=fmt, axis=axis, rounding=rounding)


def _bfp_format(fmt) -> BFPFormat:
  fmt = parse_format(fmt)
  if not isinstance(fmt, BFPFormat):
    raise ValueError(f"expected a bfp format (bfp{{m}}_b{{block}} or mxint8), got {fmt}")
  return fmt


@functools.partial(jax.jit, static_argnames=("fmt", "axis", "rounding"))
def _encode_jit(x, random_bits, *, fmt, axis, rounding):
  rb = None if random_bits is None else to_blocks(random_bits, axis, fmt.block_size)
  return _bfp.encode_blocked(to_blocks(x, axis, fmt.block_size), fmt, rounding, rb)


def bfp_encode(x: jax.Array, fmt: Union[str, BFPFormat], *, axis: int = -1,
               rounding: str = "nearest_even", random_bits: Optional[jax.Array] = None,
               key: Optional[jax.Array] = None) -> BFPBlocks:
  """Integer bfp encoding of x along `axis` (contract §2): a `BFPBlocks`.

  Layout (see `BFPBlocks`): for x of shape (d0, ..., L at axis, ..., dn) the block axis
  moves last: mantissas int32 (d0, ..., dn, nblocks, b), exponents int32 and nonfinite
  bool (d0, ..., dn, nblocks), nblocks = ceil(L / b); the last block is zero padded.
  Arguments as for `quantize`; fmt must be a bfp format (or mxint8).
  `bfp_decode(bfp_encode(x, f, axis=a), f, axis=a, length=L) == quantize(x, f, axis=a)`.
  """
  fmt = _bfp_format(fmt)
  x = as_float32(x)
  axis = normalize_axis(axis, x.ndim)
  bits = resolve_random_bits(x.shape, rounding, random_bits, key)
  return _encode_jit(x, bits, fmt=fmt, axis=axis, rounding=rounding)


@functools.partial(jax.jit, static_argnames=("fmt", "axis", "length"))
def _decode_jit(blocks, *, fmt, axis, length):
  return from_blocks(_bfp.decode_blocked(blocks, fmt), axis, length)


def bfp_decode(blocks: BFPBlocks, fmt: Union[str, BFPFormat], *, axis: int = -1,
               length: Optional[int] = None) -> jax.Array:
  """Decodes `BFPBlocks` back to a float32 tensor in the original layout.

  Args:
    blocks: as produced by `bfp_encode` (mantissas must lie in [-qmax, qmax]; they are
      not checked).
    fmt: the bfp format used to encode (its m sets the step 2^(E - (m - 2))).
    axis: where the block axis goes in the result (the `axis` given to `bfp_encode`).
    length: the original length along that axis (default nblocks * b: keep padding).
  Returns:
    float32 array: q * 2^(E - (m - 2)) rounded to float32 with FTZ; NaN for non-finite
    blocks.
  """
  fmt = _bfp_format(fmt)
  m = blocks.mantissas
  if m.ndim < 2 or m.shape[-1] != fmt.block_size:
    raise ValueError(f"mantissas must have shape (..., nblocks, {fmt.block_size}), "
                     f"got {tuple(m.shape)}")
  if (tuple(blocks.exponents.shape) != tuple(m.shape[:-1])
      or tuple(blocks.nonfinite.shape) != tuple(m.shape[:-1])):
    raise ValueError("exponents and nonfinite must have shape mantissas.shape[:-1]")
  full = m.shape[-2] * m.shape[-1]
  length = full if length is None else int(length)
  if not full - fmt.block_size < length <= full:
    raise ValueError(f"length {length} is inconsistent with {m.shape[-2]} blocks of "
                     f"{fmt.block_size}")
  axis = normalize_axis(axis, m.ndim - 1)
  blocks = BFPBlocks(jnp.asarray(m).astype(jnp.int32),
                     jnp.asarray(blocks.exponents).astype(jnp.int32),
                     jnp.asarray(blocks.nonfinite).astype(bool))
  return _decode_jit(blocks, fmt=fmt, axis=axis, length=length)
