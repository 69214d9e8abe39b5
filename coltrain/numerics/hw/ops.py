"""JAX entry points to a hardware plugin's custom calls (XLA FFI, `jax.ffi.ffi_call`).

Each function checks the request against the plugin's capabilities at trace time
(HwPluginError, a ValueError) and lowers to one `custom_call` to the plugin's target. All
work under jit, vmap (the batch axis becomes a leading dimension the handlers treat as
more rows/problems) and inside shard_map (per-shard shapes). None is differentiable:
training wraps them in the custom VJPs of `coltrain.numerics.dot`/`conv`.

Every op is bit-exact to its pure-JAX twin (tests/test_hw_*): `gemm` to
`matmul(..., datapath="exact", backend="jax")`, `quantize` to `quantize`, `pack`/`unpack`
to `coltrain.comm.compressors.bfp_pack`/`bfp_unpack`, `top_k` to the `top_k` compressor's
selection.
"""

from __future__ import annotations

from typing import Optional, Union

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from coltrain.numerics.bfp import mantissa_dtype
from coltrain.numerics.formats import BFPFormat, parse_format
from coltrain.numerics.hw.plugin import ROUNDING_CODES, HwPlugin, HwPluginError, load_plugin

PluginLike = Union[None, str, HwPlugin]


def get_plugin(plugin: PluginLike = None) -> HwPlugin:
  """An HwPlugin from a path, a loaded plugin, or None (COLTRAIN_HW_PLUGIN / built-in)."""
  return plugin if isinstance(plugin, HwPlugin) else load_plugin(plugin or None)


def _varying(x) -> frozenset:
  t = getattr(jax.typeof(x), "manual_axis_type", None)
  return frozenset(t.varying) if t is not None else frozenset()


def _call(target: str, results, *args, **attrs):
  """jax.ffi.ffi_call that also works inside shard_map: every operand is made varying
  over the union of the operands' varying mesh axes, and so are the results (an FFI
  call's results otherwise count as invariant, which custom VJPs and scans reject)."""
  single = not isinstance(results, (tuple, list))
  results = (results,) if single else tuple(results)
  vary = frozenset().union(*(_varying(a) for a in args))
  if vary:
    args = tuple(a if _varying(a) == vary
                 else lax.pcast(a, tuple(sorted(vary - _varying(a))), to="varying")
                 for a in args)
    aval = jax.typeof(args[0])
    sharding = jax.sharding.NamedSharding(aval.sharding.mesh, jax.sharding.PartitionSpec())
    results = tuple(jax.ShapeDtypeStruct(r.shape, r.dtype, sharding=sharding,
                                         manual_axis_type=aval.manual_axis_type)
                    for r in results)
  call = jax.ffi.ffi_call(target, results[0] if single else results,
                          vmap_method="broadcast_all")
  return call(*args, **attrs)


def _no_bits():
  return jnp.zeros((0,), jnp.uint32)


def _bits_or_empty(bits, like, rounding: str, what: str):
  if rounding != "stochastic":
    return _no_bits()
  if bits is None or bits.dtype != jnp.uint32 or bits.shape != like.shape:
    raise HwPluginError(f"{what}: stochastic rounding needs uint32 random bits of shape "
                        f"{like.shape}")
  return bits


def _bfp(fmt) -> BFPFormat:
  fmt = parse_format(fmt)
  if not isinstance(fmt, BFPFormat):
    raise HwPluginError(f"the hw datapath runs bfp formats (bfp{{m}}_b{{block}}, mxint8); "
                        f"got {fmt}")
  return fmt


def _f32(x, what):
  x = jnp.asarray(x)
  if x.dtype != jnp.float32:
    raise HwPluginError(f"{what} must be float32, got {x.dtype}")
  return x


def _row_op(plugin: PluginLike, op: str, fmt, x, rounding: str):
  """The shared checks of the row-wise ops (quantize, pack): (plugin, BFPFormat, x)."""
  p = get_plugin(plugin)
  fmt = _bfp(fmt)
  x = _f32(x, f"hw {op} x")
  if x.ndim == 0:
    raise HwPluginError(f"hw {op} needs an array of rank >= 1")
  p.check_format(fmt, op, rounding)
  p.check_elements(op, x.size)
  return p, fmt, x


def gemm(a: jax.Array, b: jax.Array, lhs, rhs, *, rounding: str = "nearest_even",
         bits_a: Optional[jax.Array] = None, bits_b: Optional[jax.Array] = None,
         plugin: PluginLike = None) -> jax.Array:
  """C = a @ b on the plugin's §5 datapath: a float32 (M, K), b float32 (K, N) -> (M, N).

  Both operands are quantized by the plugin along K with `rounding` (stochastic: uint32
  bits_a/bits_b shaped like a/b). lhs/rhs: bfp formats with the same block size.
  """
  p = get_plugin(plugin)
  lhs, rhs = _bfp(lhs), _bfp(rhs)
  a, b = _f32(a, "gemm a"), _f32(b, "gemm b")
  if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[0]:
    raise HwPluginError(f"hw gemm needs a (M, K) and b (K, N); got {a.shape}, {b.shape}")
  if lhs.block_size != rhs.block_size:
    raise HwPluginError(f"hw gemm needs equal block sizes; got {lhs} and {rhs}")
  m, k = a.shape
  n = b.shape[1]
  p.check_gemm(lhs, rhs, m, k, n, rounding)
  return _call(p.target("gemm"), jax.ShapeDtypeStruct((m, n), jnp.float32),
               a, b, _bits_or_empty(bits_a, a, rounding, "hw gemm a"),
               _bits_or_empty(bits_b, b, rounding, "hw gemm b"),
               lhs_mantissa_bits=np.int32(lhs.mantissa_bits),
               rhs_mantissa_bits=np.int32(rhs.mantissa_bits),
               block=np.int32(lhs.block_size), rounding=np.int32(ROUNDING_CODES[rounding]))


def quantize(x: jax.Array, fmt, *, rounding: str = "nearest_even",
             random_bits: Optional[jax.Array] = None, plugin: PluginLike = None) -> jax.Array:
  """Quantize-dequantize float32 x (..., L) to bfp `fmt`, blocked along the LAST axis."""
  p, fmt, x = _row_op(plugin, "quantize", fmt, x, rounding)
  return _call(p.target("quantize"), jax.ShapeDtypeStruct(x.shape, jnp.float32),
               x, _bits_or_empty(random_bits, x, rounding, "hw quantize"),
               mantissa_bits=np.int32(fmt.mantissa_bits), block=np.int32(fmt.block_size),
               rounding=np.int32(ROUNDING_CODES[rounding]))


def pack(x: jax.Array, fmt, *, rounding: str = "nearest_even",
         random_bits: Optional[jax.Array] = None, plugin: PluginLike = None):
  """float32 x (..., L) -> the bfp wire format along the last axis:
  (mantissas int8/int16/int32 (..., L), exponents int8 (..., ceil(L / block)), -128 for a
  NaN/inf block)."""
  p, fmt, x = _row_op(plugin, "pack", fmt, x, rounding)
  nb = -(-x.shape[-1] // fmt.block_size)
  return _call(p.target("pack"),
               (jax.ShapeDtypeStruct(x.shape, mantissa_dtype(fmt)),
                jax.ShapeDtypeStruct(x.shape[:-1] + (nb,), jnp.int8)),
               x, _bits_or_empty(random_bits, x, rounding, "hw pack"),
               mantissa_bits=np.int32(fmt.mantissa_bits), block=np.int32(fmt.block_size),
               rounding=np.int32(ROUNDING_CODES[rounding]))


def unpack(mantissas: jax.Array, exponents: jax.Array, fmt, *,
           plugin: PluginLike = None) -> jax.Array:
  """The bfp wire format -> float32 (..., L) (the quantized values, FTZ; NaN blocks)."""
  p = get_plugin(plugin)
  fmt = _bfp(fmt)
  mantissas, exponents = jnp.asarray(mantissas), jnp.asarray(exponents)
  if mantissas.dtype != mantissa_dtype(fmt) or exponents.dtype != jnp.int8:
    raise HwPluginError(f"hw unpack of {fmt} needs {jnp.dtype(mantissa_dtype(fmt)).name} "
                        f"mantissas and int8 exponents; got {mantissas.dtype}, "
                        f"{exponents.dtype}")
  nb = -(-mantissas.shape[-1] // fmt.block_size)
  if exponents.shape != mantissas.shape[:-1] + (nb,):
    raise HwPluginError(f"hw unpack: exponents shape {exponents.shape} must be "
                        f"{mantissas.shape[:-1] + (nb,)}")
  p.check_format(fmt, "unpack")
  p.check_elements("unpack", mantissas.size)
  return _call(p.target("unpack"), jax.ShapeDtypeStruct(mantissas.shape, jnp.float32),
               mantissas, exponents, mantissa_bits=np.int32(fmt.mantissa_bits),
              block=np.int32(fmt.block_size))


def top_k(x: jax.Array, k: int, *, plugin: PluginLike = None):
  """The k entries of largest magnitude of each row of float32 x (..., L), in ascending
  index order: (indices int32 (..., k), values float32 (..., k)). Magnitudes are ordered
  by their float32 bit pattern (NaN above inf, -0 == +0); ties go to the lower index."""
  p = get_plugin(plugin)
  x = _f32(x, "hw top_k x")
  if x.ndim == 0 or not 1 <= int(k) <= x.shape[-1]:
    raise HwPluginError(f"hw top_k needs 1 <= k <= row length; got k={k}, shape {x.shape}")
  p.check_elements("top_k", x.size)
  out = x.shape[:-1] + (int(k),)
  return _call(p.target("top_k"), (jax.ShapeDtypeStruct(out, jnp.int32),
                                     jax.ShapeDtypeStruct(out, jnp.float32)), x)
