"""HBFP training of convolutions: a quantized drop-in for `lax.conv_general_dilated`.

Supported: channels-last layouts (NWC/WIO, NHWC/HWIO, NDHWC/DHWIO — what flax `nn.Conv`
uses), any window strides, padding ('SAME', 'VALID', 'SAME_LOWER' or explicit pairs),
kernel (rhs) dilation; `lhs_dilation` = 1, `feature_group_count` = 1 and
`batch_group_count` = 1 (anything else raises ValueError). Operands must be float32.

Every role is an im2col GEMM (contract §1 and §6). Notation for 2-D (other ranks alike):
X (N, H, W, C), kernel K (kh, kw, C, O), output Y (N, Ho, Wo, O); a *tap* is one kernel
position t = (i, j), T = kh·kw taps in row-major order; positions p = (n, ho, wo),
P = N·Ho·Wo in row-major order.

  fwd   Y[p, o] = Σ_{t, c} patch(X)[p, (t, c)] · K[(t, c), o].
        Contraction over the patch axis in (kh, kw, C) order, **one block sequence per
        tap**: each tap's C channels split into blocks of `block_size` (the last
        shorter), never straddling taps. The blocks are: X along its channel axis
        (per pixel; every patch entry of tap t is X at one pixel, or a zero of the
        padding, so quantizing X once along C gives exactly the patch blocks), and K
        along its input-channel axis (per (tap, output channel)).
  dlhs  dX = the transposed convolution, written as the stride-1 convolution of dY
        dilated by the strides and padded by (k-1)·d - lo before / H - 1 + lo -
        (Ho-1)·s after, with the flipped kernel K'[t', o, c] = K[T-1-t', c, o]:
        dX[q, c] = Σ_{t', o} patch(dY')[q, (t', o)] · K'[(t', o), c].
        Contraction over (kh, kw, O), one block sequence per tap over the output
        channels: dY quantized along its channel axis (per pixel; dilation and padding
        zeros are all-zero blocks) and K along its output-channel axis.
  drhs  dK[(t, c), o] = Σ_p patch(X)[p, (t, c)] · dY[p, o].
        Contraction over the P output positions, flattened in (n, ho, wo) order and
        split into consecutive blocks of `block_size` (blocks may span images and
        rows): the im2col patch matrix (P, T·C) is quantized along P for each
        (tap, channel) column, and dY (P, O) along P for each output channel.

Datapaths:
  - "fake": fwd = float conv of the quantized X and K (Precision.HIGHEST); dlhs = the
    transpose (jax.linear_transpose) of that conv applied to the quantized dY with the
    Cout-blocked K; drhs = the explicit patch GEMM (im2col matrix materialized, a
    float32 dot_general at HIGHEST). Same quantized values as the im2col GEMMs; XLA's
    summation order. When both operands of drhs are fp32 the plain conv transpose is
    used (so an all-fp32 spec is the unquantized conv and its gradients).
  - "exact": every role as an explicit im2col GEMM through
    `coltrain.numerics.matmul.matmul(..., datapath="exact")` (contract §5). Blocks per
    tap are realized by zero-padding each tap's channel run to a multiple of the block
    size, so the datapath's consecutive K blocks are exactly the per-tap blocks, streamed
    tap by tap in (kh, kw, channel-block) order. Memory: the patch matrices are
    materialized (T times the activation size), so this is for verification, not speed.

Stochastic rounding bits: as in `dot.py` (`operand_bits(key, role, operand, shape)`),
with shapes: fwd X (N, H, W, C) and K (kh, kw, C, O); dlhs dY (N, Ho, Wo, O) and
K (kh, kw, C, O); drhs the im2col matrix (P, T·C) and dY as (P, O).
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
from jax import lax

from coltrain.numerics.dot import (HIGHEST, DotSpec, GemmSpec, check_key, check_operands,
                                   gemm, operand_bits, quantize_operand)
from coltrain.numerics.fakeq import fake_quantize


@dataclasses.dataclass(frozen=True)
class ConvGeometry:
  """Static convolution parameters after normalization (all tuples of ints)."""

  strides: tuple[int, ...]
  padding: tuple[tuple[int, int], ...]
  rhs_dilation: tuple[int, ...]

  @property
  def nd(self) -> int:
    return len(self.strides)


def channels_last_dimension_numbers(nd: int) -> lax.ConvDimensionNumbers:
  """lax dimension numbers of N<spatial>C / <spatial>IO / N<spatial>C."""
  sp = tuple(range(1, nd + 1))
  return lax.ConvDimensionNumbers(lhs_spec=(0, nd + 1) + sp,
                                  rhs_spec=(nd + 1, nd) + tuple(range(nd)),
                                  out_spec=(0, nd + 1) + sp)


def _tuple(v, nd: int, what: str) -> tuple[int, ...]:
  if v is None:
    return (1,) * nd
  if isinstance(v, int):
    return (v,) * nd
  v = tuple(int(a) for a in v)
  if len(v) != nd:
    raise ValueError(f"{what} must have {nd} entries, got {v}")
  return v


def tap_slices(x, spatial_axes: Sequence[int], kernel: Sequence[int], geom: ConvGeometry,
               lhs_dilation: Optional[Sequence[int]] = None) -> list[jax.Array]:
  """The im2col patches of x, one array per tap (kernel positions in row-major order).

  x has its spatial dims at `spatial_axes`; it is dilated by `lhs_dilation` (zeros
  between elements), padded by `geom.padding` (negative = crop), and for tap t the slice
  x'[..., t·d + o·s, ...] over output positions o is returned, shaped like x with the
  spatial dims replaced by the output spatial dims.
  """
  nd = geom.nd
  lhs_dilation = (1,) * nd if lhs_dilation is None else tuple(lhs_dilation)
  cfg = [(0, 0, 0)] * x.ndim
  for i, ax in enumerate(spatial_axes):
    lo, hi = geom.padding[i]
    cfg[ax] = (lo, hi, lhs_dilation[i] - 1)
  xp = lax.pad(x, jnp.zeros((), x.dtype), cfg)
  out = []
  for i, ax in enumerate(spatial_axes):
    span = (kernel[i] - 1) * geom.rhs_dilation[i] + 1
    n = (xp.shape[ax] - span) // geom.strides[i] + 1
    if n <= 0:
      raise ValueError(f"convolution output would be empty along spatial dim {i}")
    out.append(n)
  slices = []
  for tap in itertools.product(*[range(k) for k in kernel]):
    start = [0] * x.ndim
    limit = list(xp.shape)
    step = [1] * x.ndim
    for i, ax in enumerate(spatial_axes):
      start[ax] = tap[i] * geom.rhs_dilation[i]
      limit[ax] = start[ax] + (out[i] - 1) * geom.strides[i] + 1
      step[ax] = geom.strides[i]
    slices.append(lax.slice(xp, start, limit, step))
  return slices


def transpose_geometry(geom: ConvGeometry, kernel: Sequence[int], in_spatial: Sequence[int],
                       out_spatial: Sequence[int]) -> ConvGeometry:
  """Geometry of dlhs as a stride-1 conv of the stride-dilated dY (module doc)."""
  pads = []
  for i in range(geom.nd):
    span = (kernel[i] - 1) * geom.rhs_dilation[i]
    lo = geom.padding[i][0]
    pads.append((span - lo, in_spatial[i] - 1 + lo - (out_spatial[i] - 1) * geom.strides[i]))
  return ConvGeometry((1,) * geom.nd, tuple(pads), geom.rhs_dilation)


def _pad_last(a, block: int):
  """Zero-pads the last axis to a multiple of `block` (per-tap blocks for the exact GEMM)."""
  pad = -a.shape[-1] % block
  if pad:
    a = jnp.pad(a, [(0, 0)] * (a.ndim - 1) + [(0, pad)])
  return a


def _conv(x, w, geom: ConvGeometry):
  return lax.conv_general_dilated(x, w, geom.strides, geom.padding,
                                   rhs_dilation=geom.rhs_dilation,
                                   dimension_numbers=channels_last_dimension_numbers(geom.nd),
                                   precision=HIGHEST)


def _block_size(g: GemmSpec) -> int:
  return g.lhs.block_size


# --- the three roles --------------------------------------------------------------------

def conv_fwd(spec: DotSpec, geom: ConvGeometry, x, w, key):
  g = spec.fwd
  qx = quantize_operand(x, g.lhs, g.lhs_rounding, -1, key, 0, 0, spec=spec)  # along C
  qw = quantize_operand(w, g.rhs, g.rhs_rounding, w.ndim - 2, key, 0, 1, spec=spec)  # Cin
  if spec.datapath == "fake" or g.is_fp32:
    return _conv(qx, qw, geom)
  nd = geom.nd
  kernel = w.shape[:nd]
  b = _block_size(g)
  taps = im2col(qx, kernel, geom)                           # (N, out.., T, C)
  out_shape = taps.shape[:-2]
  taps = _pad_last(taps, b)                                 # per-tap blocks
  a = taps.reshape(-1, taps.shape[-2] * taps.shape[-1])     # (P, T*Cp)
  wt = _pad_last(jnp.moveaxis(qw.reshape((-1,) + w.shape[nd:]), -1, 0), b)  # (O, T, Cp)
  wt = wt.reshape(wt.shape[0], -1).T                                        # (T*Cp, O)
  y = gemm(a, wt, g, "exact", spec.backend, spec.hw_plugin)
  return y.reshape(out_shape + (w.shape[-1],))


def conv_dlhs(spec: DotSpec, geom: ConvGeometry, x_shape, w, dy, key):
  g = spec.dlhs
  nd = geom.nd
  qdy = quantize_operand(dy, g.lhs, g.lhs_rounding, -1, key, 1, 0, spec=spec)  # along Cout
  qw = quantize_operand(w, g.rhs, g.rhs_rounding, -1, key, 1, 1, spec=spec)  # along Cout
  if spec.datapath == "fake" or g.is_fp32:
    conv_t = jax.linear_transpose(lambda a: _conv(a, qw, geom),
                                  jax.ShapeDtypeStruct(x_shape, jnp.float32))
    return conv_t(qdy)[0]
  kernel = w.shape[:nd]
  b = _block_size(g)
  tgeom = transpose_geometry(geom, kernel, x_shape[1:nd + 1], dy.shape[1:nd + 1])
  taps = im2col(qdy, kernel, tgeom, lhs_dilation=geom.strides)  # (N, in.., T, O)
  out_shape = taps.shape[:-2]
  if tuple(out_shape[1:]) != tuple(x_shape[1:nd + 1]):
    raise AssertionError(f"transposed conv shape {out_shape} != {x_shape}")
  taps = _pad_last(taps, b)
  a = taps.reshape(-1, taps.shape[-2] * taps.shape[-1])
  # Flipped kernel K'[t', o, c] = K[T-1-t', c, o], Cout padded per tap.
  wf = qw[tuple(slice(None, None, -1) for _ in range(nd))]
  wf = wf.reshape((-1,) + w.shape[nd:])                   # (T, C, O)
  wf = _pad_last(jnp.swapaxes(wf, 1, 2).transpose(2, 0, 1), b)  # (C, T, Op)
  wf = wf.reshape(wf.shape[0], -1).T                      # (T*Op, C)
  dx = gemm(a, wf, g, "exact", spec.backend, spec.hw_plugin)
  return dx.reshape(tuple(x_shape))


def im2col(x, kernel: Sequence[int], geom: ConvGeometry,
           lhs_dilation: Optional[Sequence[int]] = None) -> jax.Array:
  """x (N, spatial..., C) -> patches (N, out..., T, C), taps in row-major kernel order, so
  reshaping to (P, T*C) gives the im2col matrix with columns in (kh, kw, C) order."""
  nd = geom.nd
  return jnp.stack(tap_slices(x, range(1, nd + 1), kernel, geom, lhs_dilation), axis=-2)


# Below this many input channels the fake drhs quantizes the whole im2col matrix at
# once; from it on, tap by tap (cache-friendly, and XLA CPU runs the per-tap GEMMs
# faster than one tall-skinny GEMM). Same quantized values either way.
PER_TAP_MIN_CHANNELS = 8


def conv_drhs(spec: DotSpec, geom: ConvGeometry, x, w_shape, dy, key):
  g = spec.drhs
  nd = geom.nd
  if g.is_fp32:
    conv_t = jax.linear_transpose(lambda k: _conv(x, k, geom),
                                  jax.ShapeDtypeStruct(w_shape, jnp.float32))
    return conv_t(dy)[0]
  o = dy.shape[-1]
  c = x.shape[-1]
  kernel = tuple(w_shape[:nd])
  qdy = quantize_operand(dy.reshape(-1, o), g.rhs, g.rhs_rounding, 0, key, 2, 1,
                         spec=spec)  # along P
  if spec.datapath == "fake" and g.lhs.kind == "fp32":
    # Unquantized patches are X itself: the plain weight-gradient conv of the quantized dY.
    conv_t = jax.linear_transpose(lambda k: _conv(x, k, geom),
                                  jax.ShapeDtypeStruct(w_shape, jnp.float32))
    return conv_t(qdy.reshape(dy.shape))[0]
  dims = (((0,), (0,)), ((), ()))
  if spec.datapath == "fake" and c >= PER_TAP_MIN_CHANNELS:
    taps = tap_slices(x, range(1, nd + 1), kernel, geom)
    p = taps[0].size // c
    bits = None
    if g.lhs.kind != "fp32" and g.lhs_rounding == "stochastic":
      bits = operand_bits(key, 2, 0, (p, len(taps) * c)).reshape(p, len(taps), c)
    outs = []
    for t, xt in enumerate(taps):                            # (N, out.., C) per tap
      bt = None if bits is None else bits[:, t, :]
      qt = fake_quantize(xt.reshape(p, c), g.lhs, 0, g.lhs_rounding, bt)  # along P
      outs.append(lax.dot_general(qt, qdy, dims, precision=HIGHEST))      # (C, O)
    return jnp.stack(outs).reshape(tuple(w_shape))
  patches = im2col(x, kernel, geom)
  pm = patches.reshape(-1, patches.shape[-2] * patches.shape[-1])   # (P, T*C)
  qp = quantize_operand(pm, g.lhs, g.lhs_rounding, 0, key, 2, 0, spec=spec)  # along P
  dw = gemm(qp.T, qdy, g, spec.datapath, spec.backend, spec.hw_plugin)  # (T*C, O)
  return dw.reshape(tuple(w_shape))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _qconv(spec: DotSpec, geom: ConvGeometry, x, w, key):
  return conv_fwd(spec, geom, x, w, key)


def _qconv_fwd(spec, geom, x, w, key):
  return conv_fwd(spec, geom, x, w, key), (x, w, key)


def _qconv_bwd(spec, geom, res, dy):
  x, w, key = res
  return (conv_dlhs(spec, geom, x.shape, w, dy, key),
          conv_drhs(spec, geom, x, w.shape, dy, key), None)


_qconv.defvjp(_qconv_fwd, _qconv_bwd)


def normalize_conv_args(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                        dimension_numbers, feature_group_count, batch_group_count
                        ) -> ConvGeometry:
  """Validates a conv_general_dilated call and returns its `ConvGeometry`."""
  if lhs.ndim < 3 or lhs.ndim != rhs.ndim:
    raise ValueError(f"quantized conv needs lhs (N, spatial..., C) and rhs (spatial..., "
                     f"Cin, Cout) of equal rank >= 3; got {lhs.shape}, {rhs.shape}")
  nd = lhs.ndim - 2
  if dimension_numbers is None:
    raise ValueError("quantized conv supports only channels-last layouts "
                     "(NHWC/HWIO/NHWC and their 1-D/3-D forms); dimension_numbers=None "
                     "means NCHW/OIHW")
  dn = lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
  if dn != channels_last_dimension_numbers(nd):
    raise ValueError(f"quantized conv supports only channels-last layouts (N<spatial>C, "
                     f"<spatial>IO, N<spatial>C, as flax nn.Conv uses); got {dn}")
  if feature_group_count != 1 or batch_group_count != 1:
    raise ValueError(f"quantized conv supports feature_group_count=1 and "
                     f"batch_group_count=1 only; got {feature_group_count}, "
                     f"{batch_group_count}")
  if any(d != 1 for d in _tuple(lhs_dilation, nd, "lhs_dilation")):
    raise ValueError(f"quantized conv does not support lhs (input) dilation, got "
                     f"{lhs_dilation}")
  if rhs.shape[-2] != lhs.shape[-1]:
    raise ValueError(f"kernel input channels {rhs.shape[-2]} != input channels "
                     f"{lhs.shape[-1]}")
  strides = _tuple(window_strides, nd, "window_strides")
  rdil = _tuple(rhs_dilation, nd, "rhs_dilation")
  if any(s < 1 for s in strides) or any(d < 1 for d in rdil):
    raise ValueError(f"strides and dilations must be >= 1; got {strides}, {rdil}")
  if isinstance(padding, str):
    span = [(k - 1) * d + 1 for k, d in zip(rhs.shape[:nd], rdil)]
    pads = lax.padtype_to_pads(lhs.shape[1:nd + 1], span, strides, padding)
  else:
    pads = padding
  try:
    pads = tuple((int(lo), int(hi)) for lo, hi in pads)
  except (TypeError, ValueError):
    raise ValueError(f"malformed padding {padding!r}") from None
  if len(pads) != nd:
    raise ValueError(f"padding needs {nd} (lo, hi) pairs, got {pads}")
  return ConvGeometry(strides, pads, rdil)


def quantized_conv_general_dilated(spec: DotSpec):
  """A drop-in for `lax.conv_general_dilated` whose three GEMMs follow `spec`.

  Returns `conv(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
  dimension_numbers=None, feature_group_count=1, batch_group_count=1, precision=None,
  preferred_element_type=None, *, key=None)`; see the module doc for what is supported
  and what each role's blocks are. `key` is required iff `spec.needs_key`.
  """
  if not isinstance(spec, DotSpec):
    raise ValueError(f"quantized_conv_general_dilated needs a DotSpec, got {spec!r}")

  def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None,
                           rhs_dilation=None, dimension_numbers=None,
                           feature_group_count=1, batch_group_count=1, precision=None,
                           preferred_element_type=None, *, key=None, out_sharding=None):
    del precision
    lhs, rhs = check_operands(lhs, rhs, preferred_element_type, out_sharding, "conv")
    geom = normalize_conv_args(lhs, rhs, window_strides, padding, lhs_dilation,
                               rhs_dilation, dimension_numbers, feature_group_count,
                               batch_group_count)
    return _qconv(spec, geom, lhs, rhs, check_key(spec, key, "quantized conv"))

  conv_general_dilated.spec = spec
  return conv_general_dilated
