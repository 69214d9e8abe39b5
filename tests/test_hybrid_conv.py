"""The quantized conv_general_dilated: every role is the im2col GEMM of contract §1/§6
(blocks per tap over channels for fwd/dlhs, along the flattened output positions for
drhs), checked against an independent im2col reference built with
lax.conv_general_dilated_patches."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from coltrain.numerics.conv import quantized_conv_general_dilated
from coltrain.numerics.dot import DotSpec, GemmSpec, operand_bits
from coltrain.numerics.matmul import matmul
from coltrain.numerics.quantize import quantize

HI = lax.Precision.HIGHEST
DN = {1: ("NWC", "WIO", "NWC"), 2: ("NHWC", "HWIO", "NHWC"), 3: ("NDHWC", "DHWIO", "NDHWC")}
PATCH_DN = {1: ("NWC", "OIW", "NWC"), 2: ("NHWC", "OIHW", "NHWC"),
            3: ("NDHWC", "OIDHW", "NDHWC")}

# (x shape, kernel shape, strides, padding, rhs_dilation)
GEOMS = {
    "same": ((2, 7, 6, 3), (3, 3, 3, 5), (1, 1), "SAME", (1, 1)),
    "stride-dil": ((2, 9, 8, 4), (3, 2, 4, 6), (2, 3), "VALID", (1, 2)),
    "pads": ((1, 8, 7, 10), (3, 3, 10, 4), (2, 2), ((2, 0), (1, 3)), (2, 1)),
    "1d": ((3, 13, 5), (4, 5, 7), (3,), "SAME", (2,)),
    "3d": ((1, 4, 5, 4, 2), (2, 3, 2, 2, 3), (1, 2, 1), "SAME", (1, 1, 2)),
}


def _pads(xs, ks, strides, padding, dil):
  nd = len(xs) - 2
  if isinstance(padding, str):
    span = [(k - 1) * d + 1 for k, d in zip(ks[:nd], dil)]
    return lax.padtype_to_pads(xs[1:nd + 1], span, strides, padding)
  return list(padding)


def _conv(x, w, g):
  _, ks, strides, padding, dil = g
  return lax.conv_general_dilated(x, w, strides, padding, rhs_dilation=dil,
                                  dimension_numbers=DN[x.ndim - 2], precision=HI)


def _qconv(spec, x, w, g, key=None):
  _, _, strides, padding, dil = g
  return quantized_conv_general_dilated(spec)(x, w, strides, padding, rhs_dilation=dil,
                                              dimension_numbers=DN[x.ndim - 2], key=key)


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _run(fn_name, geom_name, spec, x, w, dy, key):
  g = GEOMS[geom_name]
  f = (lambda a, b: _conv(a, b, g)) if fn_name == "lax" else (
      lambda a, b: _qconv(spec, a, b, g, key))
  y, vjp = jax.vjp(f, x, w)
  return (y,) + vjp(dy)


def _data(geom_name, seed, integer=False):
  xs, ks, *_ = GEOMS[geom_name]
  rng = np.random.default_rng(seed)
  ys = jax.eval_shape(lambda a, b: _conv(a, b, GEOMS[geom_name]),
                      jax.ShapeDtypeStruct(xs, jnp.float32), jax.ShapeDtypeStruct(ks, jnp.float32)).shape
  if integer:
    mk = lambda s: jnp.asarray(rng.integers(-15, 16, s), jnp.float32)
  else:
    mk = lambda s: jnp.asarray(rng.standard_normal(s), jnp.float32)
  return mk(xs), mk(ks), mk(ys)


def _same(a, b):
  return np.array_equal(np.asarray(a), np.asarray(b))


# ---- an independent im2col reference ---------------------------------------------------

def _patches(x, ks, strides, pads, dil, lhs_dilation=None):
  """(N, out..., T, C) patches in (taps row-major, C) order via conv_general_dilated_patches
  (whose features come out channel-major, (C, k...), and are reordered here)."""
  nd = x.ndim - 2
  p = lax.conv_general_dilated_patches(x, ks[:nd], strides, pads, lhs_dilation=lhs_dilation,
                                       rhs_dilation=dil, dimension_numbers=PATCH_DN[nd],
                                       precision=HI)
  c = x.shape[-1]
  p = p.reshape(p.shape[:-1] + (c, -1))          # (N, out..., C, T)
  return jnp.swapaxes(p, -1, -2)                 # (N, out..., T, C)


def _q(x, fmt, axis, rounding, key, role, operand, bits_shape=None):
  if fmt.kind == "fp32":
    return x
  bits = None
  if rounding == "stochastic":
    bits = operand_bits(key, role, operand, bits_shape or x.shape).reshape(x.shape)
  return quantize(x, fmt, axis=axis, rounding=rounding, random_bits=bits)


def _gemm(a, b, g, exact):
  if exact:
    return matmul(a, b, lhs=g.lhs, rhs=g.rhs, datapath="exact")
  return jnp.matmul(a, b, precision=HI)


def _pad_c(a, b):
  return jnp.pad(a, [(0, 0)] * (a.ndim - 1) + [(0, -a.shape[-1] % b)])


def _reference(spec, geom_name, x, w, dy, key, exact, straddle=False, fwd_only=False):
  """(Y, dX, dW) as explicit im2col GEMMs per contract §1/§6."""
  xs, ks, strides, padding, dil = GEOMS[geom_name]
  nd = x.ndim - 2
  pads = _pads(xs, ks, strides, padding, dil)
  t = int(np.prod(ks[:nd]))
  c, o = ks[-2], ks[-1]
  # fwd: X blocked along C per pixel, K along Cin; per-tap blocks via channel padding.
  f = spec.fwd
  b = f.lhs.block_size
  qx = _q(x, f.lhs, -1, f.lhs_rounding, key, 0, 0)
  qw = _q(w, f.rhs, nd, f.rhs_rounding, key, 0, 1)
  p = _patches(qx, ks, strides, pads, dil)
  out_shape = p.shape[:-2]
  if straddle:  # NOT the contract: contiguous blocks across taps (for the negative test)
    a = quantize(_patches(x, ks, strides, pads, dil).reshape(-1, t * c), f.lhs, axis=1)
    wk = quantize(w.reshape(t * c, o), f.rhs, axis=0)
    return jnp.matmul(a, wk, precision=HI).reshape(out_shape + (o,))
  a = _pad_c(p, b).reshape(-1, t * (c + (-c % b)))
  wk = _pad_c(jnp.moveaxis(qw.reshape(t, c, o), -1, 0), b).reshape(o, -1).T
  y = _gemm(a, wk, f, exact).reshape(out_shape + (o,))
  if fwd_only:
    return y
  # dlhs: stride-dilated, padded dY convolved with the flipped kernel, blocks per tap
  # over Cout.
  l = spec.dlhs
  b = l.lhs.block_size
  qdy = _q(dy, l.lhs, -1, l.lhs_rounding, key, 1, 0)
  qw = _q(w, l.rhs, -1, l.rhs_rounding, key, 1, 1)
  tp = [((k - 1) * d - lo, xs[1 + i] - 1 + lo - (dy.shape[1 + i] - 1) * s)
        for i, (k, d, (lo, _), s) in enumerate(zip(ks[:nd], dil, pads, strides))]
  pd = _patches(qdy, ks, (1,) * nd, tp, dil, lhs_dilation=strides)
  assert pd.shape[:-2] == x.shape[:-1]
  a = _pad_c(pd, b).reshape(-1, t * (o + (-o % b)))
  wf = jnp.flip(qw, axis=tuple(range(nd))).reshape(t, c, o)
  wf = _pad_c(jnp.transpose(wf, (1, 0, 2)), b).reshape(c, -1).T        # (T*Op, C)
  dx = _gemm(a, wf, l, exact).reshape(x.shape)
  # drhs: im2col matrix (P, T*C) and dY (P, O), both blocked along P.
  r = spec.drhs
  pm = _patches(x, ks, strides, pads, dil).reshape(-1, t * c)
  qp = _q(pm, r.lhs, 0, r.lhs_rounding, key, 2, 0)
  qg = _q(dy.reshape(-1, o), r.rhs, 0, r.rhs_rounding, key, 2, 1)
  dw = _gemm(qp.T, qg, r, exact).reshape(w.shape)
  return y, dx, dw


_reference_jit = jax.jit(_reference, static_argnums=(0, 1, 6, 7, 8))


def _spec(datapath, b=4, fwd="bfp8", dlhs="bfp6", drhs="bfp7"):
  return DotSpec(fwd=GemmSpec(f"{fwd}_b{b}", f"{fwd}_b{b}"),
                 dlhs=GemmSpec(f"{dlhs}_b{b}", f"{dlhs}_b{b}", "stochastic", "nearest_even"),
                 drhs=GemmSpec(f"{drhs}_b{b}", f"{drhs}_b{b}", "stochastic", "stochastic"),
                 datapath=datapath)


# ---- tests -------------------------------------------------------------------------------

@pytest.mark.parametrize("geom", list(GEOMS))
def test_fp32_spec_is_lax_conv(geom):
  x, w, dy = _data(geom, 0)
  got = _run("q", geom, DotSpec(), x, w, dy, None)
  want = _run("lax", geom, DotSpec(), x, w, dy, None)
  for a, b in zip(got, want):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("geom", ["stride-dil", "pads", "3d"])
def test_exact_im2col_gemms_reproduce_conv_and_its_vjp(geom):
  """On small integers bfp8 (block 4) is lossless and every sum exact, so the exact
  datapath's explicit im2col GEMMs must reproduce lax conv and jax.vjp bit for bit: this
  checks the patch construction, tap order, transposed-conv padding and flipped kernel."""
  x, w, dy = _data(geom, 1, integer=True)
  spec = DotSpec(*(GemmSpec("bfp8_b4", "bfp8_b4"),) * 3, datapath="exact")
  got = _run("q", geom, spec, x, w, dy, None)
  want = _run("lax", geom, spec, x, w, dy, None)
  for name, a, b in zip(("fwd", "dlhs", "drhs"), got, want):
    assert _same(a, b), name


@pytest.mark.parametrize("geom", ["pads"])
def test_exact_matches_im2col_reference(geom):
  x, w, dy = _data(geom, 2)
  spec = _spec("exact")
  key = jax.random.PRNGKey(11)
  got = _run("q", geom, spec, x, w, dy, key)
  want = _reference_jit(spec, geom, x, w, dy, key, True)
  for name, a, b in zip(("fwd", "dlhs", "drhs"), got, want):
    assert _same(a, b), name


@pytest.mark.parametrize("geom", ["same", "pads", "1d"])   # "pads" has C >= 8: per-tap drhs
def test_fake_matches_im2col_reference(geom):
  x, w, dy = _data(geom, 3)
  spec = _spec("fake", b=8)
  key = jax.random.PRNGKey(5)
  got = _run("q", geom, spec, x, w, dy, key)
  want = _reference_jit(spec, geom, x, w, dy, key, False)
  for name, a, b in zip(("fwd", "dlhs", "drhs"), got, want):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-6, atol=2e-6,
                               err_msg=name)


def test_blocks_never_straddle_kernel_taps():
  """C = 3 channels, block 64: each tap has its own (short) block. With taps of very
  different magnitudes a block spanning taps would flush the small taps to zero."""
  geom = "same"
  xs, ks, *_ = GEOMS[geom]
  rng = np.random.default_rng(4)
  x = jnp.asarray(rng.standard_normal(xs) * np.where(np.arange(xs[2]) % 2, 1e4, 1e-3)[
      None, None, :, None], jnp.float32)
  w = jnp.asarray(rng.standard_normal(ks), jnp.float32)
  dy = jnp.zeros(jax.eval_shape(lambda a, b: _conv(a, b, GEOMS[geom]), x, w).shape)
  spec = DotSpec(fwd=GemmSpec("bfp4", "bfp4"), datapath="exact")
  y = _run("q", geom, spec, x, w, dy, None)[0]
  assert _same(y, _reference_jit(spec, geom, x, w, dy, None, True, False, True))
  straddled = _reference_jit(spec, geom, x, w, dy, None, False, True)
  assert not np.allclose(np.asarray(y), np.asarray(straddled), rtol=1e-3)
  # A single-tap conv sees exactly X quantized along channels.
  qx = quantize(x, "bfp4", axis=-1)
  y1 = _qconv(spec, x, jnp.ones((1, 1, 3, 1)), (None, None, (1, 1), "VALID", (1, 1)))
  assert _same(y1[..., 0], matmul(qx.reshape(-1, 3), jnp.ones((3, 1)), lhs="bfp4",
                                  rhs="bfp4", datapath="exact").reshape(y1.shape[:-1]))


def test_stochastic_keys():
  geom = "pads"
  x, w, dy = _data(geom, 5)
  spec = DotSpec(*(GemmSpec("bfp4_b8", "bfp4_b8", "stochastic", "stochastic"),) * 3)
  a = _run("q", geom, spec, x, w, dy, jax.random.PRNGKey(1))
  b = _run("q", geom, spec, x, w, dy, jax.random.PRNGKey(1))
  c = _run("q", geom, spec, x, w, dy, jax.random.PRNGKey(2))
  for u, v, z in zip(a, b, c):
    assert _same(u, v) and not _same(u, z)


def test_errors():
  spec = DotSpec(fwd=GemmSpec("bfp8", "bfp8"))
  conv = quantized_conv_general_dilated(spec)
  x, w = jnp.ones((1, 5, 5, 4)), jnp.ones((3, 3, 4, 2))
  assert conv(x, w, (1, 1), "SAME", dimension_numbers=DN[2]).shape == (1, 5, 5, 2)
  with pytest.raises(ValueError, match="channels-last"):
    conv(x, w, (1, 1), "SAME")
  with pytest.raises(ValueError, match="channels-last"):
    conv(jnp.ones((1, 4, 5, 5)), jnp.ones((2, 4, 3, 3)), (1, 1), "SAME",
         dimension_numbers=("NCHW", "OIHW", "NCHW"))
  with pytest.raises(ValueError, match="feature_group_count"):
    conv(x, jnp.ones((3, 3, 2, 2)), (1, 1), "SAME", dimension_numbers=DN[2],
         feature_group_count=2)
  with pytest.raises(ValueError, match="dilation"):
    conv(x, w, (1, 1), "SAME", lhs_dilation=(2, 2), dimension_numbers=DN[2])
  with pytest.raises(ValueError, match="float32"):
    conv(x.astype(jnp.bfloat16), w, (1, 1), "SAME", dimension_numbers=DN[2])
  sr = quantized_conv_general_dilated(
      DotSpec(dlhs=GemmSpec("bfp8", "bfp8", "stochastic", "nearest_even")))
  with pytest.raises(ValueError, match="key"):
    sr(x, w, (1, 1), "SAME", dimension_numbers=DN[2])
