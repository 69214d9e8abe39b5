"""The quantized dot_general: forward and both gradients against the contract's definition
of each role (§6), on the fake and the exact datapath."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from coltrain.numerics.dot import (DotSpec, GemmSpec, operand_bits, quantized_dot_general,
                                   quantized_gemm)
from coltrain.numerics.matmul import matmul
from coltrain.numerics.quantize import quantize

HI = lax.Precision.HIGHEST
DENSE_DN = (((1,), (0,)), ((), ()))


def _rand(rng, shape, scale=1.0):
  return jnp.asarray(rng.standard_normal(shape) * scale, jnp.float32)


def _q(x, fmt, axis, rounding, key, role, operand):
  """Reference operand quantization: the official quantizer with the documented bits."""
  if fmt == "fp32":
    return x
  bits = operand_bits(key, role, operand, x.shape) if rounding == "stochastic" else None
  return quantize(x, fmt, axis=axis, rounding=rounding, random_bits=bits)


def _reference(spec, x, w, dy, key):
  """(Y, dX, dW) per contract §6 with the fake datapath: quantize, then a float matmul."""
  f, l, r = spec.fwd, spec.dlhs, spec.drhs
  y = jnp.matmul(_q(x, f.lhs, 1, f.lhs_rounding, key, 0, 0),
                 _q(w, f.rhs, 0, f.rhs_rounding, key, 0, 1), precision=HI)
  dx = jnp.matmul(_q(dy, l.lhs, 1, l.lhs_rounding, key, 1, 0),
                  _q(w, l.rhs, 1, l.rhs_rounding, key, 1, 1).T, precision=HI)
  dw = jnp.matmul(_q(x, r.lhs, 0, r.lhs_rounding, key, 2, 0).T,
                  _q(dy, r.rhs, 0, r.rhs_rounding, key, 2, 1), precision=HI)
  return y, dx, dw


def _vjp_jit(spec, x, w, dy, key):
  y, vjp = jax.vjp(lambda a, b: quantized_gemm(spec, a, b, key), x, w)
  return (y,) + vjp(dy)


_vjp_jit = jax.jit(_vjp_jit, static_argnums=0)


def _vjp(spec, x, w, dy, key):
  return _vjp_jit(spec, x, w, dy, key)


def _bits_equal(a, b):
  return np.array_equal(np.asarray(a), np.asarray(b))


MIXED = DotSpec(fwd=GemmSpec("bfp8", "bfp6_b64", "nearest_even", "nearest_even"),
                dlhs=GemmSpec("bfp8_b32", "bfp8_b32", "stochastic", "nearest_even"),
                drhs=GemmSpec("bfp5_b16", "bfp8_b16", "toward_zero", "stochastic"))
MX = DotSpec(fwd=GemmSpec("mxfp8_e4m3", "mxfp8_e4m3"),
             dlhs=GemmSpec("mxfp8_e5m2", "fp32"),
             drhs=GemmSpec("fp32", "mxint8", "nearest_even", "stochastic"))


@pytest.mark.parametrize("spec", [MIXED, MX], ids=["bfp-mixed", "mx-fp32-mix"])
def test_fake_roles_match_contract_definition(spec):
  rng = np.random.default_rng(0)
  m, k, n = 70, 150, 90       # short last blocks on every axis
  x, w, dy = _rand(rng, (m, k)), _rand(rng, (k, n), 0.1), _rand(rng, (m, n), 1e-3)
  key = jax.random.PRNGKey(42)
  got = _vjp(spec, x, w, dy, key)
  want = jax.jit(_reference, static_argnums=0)(spec, x, w, dy, key)
  for name, a, b in zip(("fwd", "dlhs", "drhs"), got, want):
    assert _bits_equal(a, b), name


def test_exact_roles_match_matmul_exact():
  """Each role with one rounding mode on both operands is exactly coltrain's
  matmul(datapath='exact') of the float operands laid out as the role's GEMM."""
  spec = DotSpec(fwd=GemmSpec("bfp8", "bfp6"),
                 dlhs=GemmSpec("bfp8_b32", "bfp8_b32", "stochastic", "stochastic"),
                 drhs=GemmSpec("bfp7_b16", "bfp8_b16", "toward_zero", "toward_zero"),
                 datapath="exact")
  rng = np.random.default_rng(1)
  m, k, n = 40, 100, 50
  x, w, dy = _rand(rng, (m, k)), _rand(rng, (k, n)), _rand(rng, (m, n))
  key = jax.random.PRNGKey(7)
  y, dx, dw = _vjp(spec, x, w, dy, key)
  assert _bits_equal(y, matmul(x, w, lhs="bfp8", rhs="bfp6", datapath="exact"))
  bits = (operand_bits(key, 1, 0, dy.shape), operand_bits(key, 1, 1, w.shape).T)
  assert _bits_equal(dx, matmul(dy, w.T, lhs="bfp8_b32", rhs="bfp8_b32", datapath="exact",
                                rounding="stochastic", random_bits=bits))
  assert _bits_equal(dw, matmul(x.T, dy, lhs="bfp7_b16", rhs="bfp8_b16", datapath="exact",
                                rounding="toward_zero"))


def test_exact_mixed_rounding_matches_prequantized_matmul():
  """Per-operand rounding (not offered by matmul): quantize each operand with its own
  rounding, then the exact datapath."""
  spec = DotSpec(fwd=MIXED.fwd, dlhs=MIXED.dlhs, drhs=GemmSpec("bfp5_b16", "bfp8_b16",
                                                               "nearest_even", "stochastic"),
                 datapath="exact")
  rng = np.random.default_rng(2)
  x, w, dy = _rand(rng, (33, 80)), _rand(rng, (80, 20)), _rand(rng, (33, 20))
  key = jax.random.PRNGKey(3)
  got = _vjp(spec, x, w, dy, key)
  f, l, r = spec.fwd, spec.dlhs, spec.drhs
  want = (
      matmul(x, w, lhs=f.lhs, rhs=f.rhs, datapath="exact"),
      matmul(_q(dy, l.lhs, 1, "stochastic", key, 1, 0), _q(w, l.rhs, 1, "nearest_even",
                                                           key, 1, 1).T,
             lhs=l.lhs, rhs=l.rhs, datapath="exact"),
      matmul(_q(x, r.lhs, 0, "nearest_even", key, 2, 0).T,
             _q(dy, r.rhs, 0, "stochastic", key, 2, 1), lhs=r.lhs, rhs=r.rhs,
             datapath="exact"),
  )
  for name, a, b in zip(("fwd", "dlhs", "drhs"), got, want):
    assert _bits_equal(a, b), name


@pytest.mark.parametrize("shapes", [
    ((32, 48), (48, 20), DENSE_DN),                                   # Dense
    ((4, 6, 48), (48, 20), (((2,), (0,)), ((), ()))),                 # Dense on (B, T, K)
    ((2, 3, 5, 7), (3, 7, 4, 5), (((1, 3), (0, 1)), ((), ()))),       # DenseGeneral
    ((2, 3, 5, 7), (7, 3, 4), (((3, 1), (0, 1)), ((), ()))),          # reordered axes
], ids=["dense", "dense3d", "densegeneral", "reordered"])
def test_fp32_spec_is_lax_dot_general(shapes):
  xs, ws, dn = shapes
  rng = np.random.default_rng(3)
  x, w = _rand(rng, xs), _rand(rng, ws)
  qdot = quantized_dot_general(DotSpec())

  def run(fn):
    def f(x, w, g):
      y, vjp = jax.vjp(lambda a, b: fn(a, b, dn), x, w)
      return (y,) + vjp(g)
    y = jax.eval_shape(lambda a, b: lax.dot_general(a, b, dn), x, w)
    return jax.jit(f)(x, w, _rand(rng, y.shape))

  rng = np.random.default_rng(4)
  got = run(qdot)
  rng = np.random.default_rng(4)
  want = run(lax.dot_general)
  for a, b in zip(got, want):
    assert a.shape == b.shape
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-6)


def test_dense_general_roles_use_flattened_axes():
  """For N-D operands M flattens lhs's free dims (the batch/token axis of drhs) and K its
  contracting dims: the result equals the 2-D quantized GEMM of the reshaped operands."""
  spec = DotSpec(*(GemmSpec("bfp4_b8", "bfp4_b8"),) * 3)
  rng = np.random.default_rng(5)
  x, w = _rand(rng, (4, 6, 3, 5)), _rand(rng, (3, 5, 7))
  dn = (((2, 3), (0, 1)), ((), ()))
  g = _rand(rng, (4, 6, 7))
  qdot = quantized_dot_general(spec)

  @jax.jit
  def both(x, w, g):
    y, vjp = jax.vjp(lambda a, b: qdot(a, b, dn), x, w)
    y2, vjp2 = jax.vjp(lambda a, b: quantized_gemm(spec, a, b), x.reshape(24, 15),
                       w.reshape(15, 7))
    return (y,) + vjp(g) + (y2,) + vjp2(g.reshape(24, 7))

  y, dx, dw, y2, dx2, dw2 = both(x, w, g)
  assert _bits_equal(y, y2.reshape(4, 6, 7))
  assert _bits_equal(dx, dx2.reshape(x.shape))
  assert _bits_equal(dw, dw2.reshape(w.shape))


def test_stochastic_keys():
  spec = DotSpec(*(GemmSpec("bfp4", "bfp4", "stochastic", "stochastic"),) * 3)
  rng = np.random.default_rng(6)
  x, w, dy = _rand(rng, (16, 64)), _rand(rng, (64, 8)), _rand(rng, (16, 8))
  k1, k2 = jax.random.PRNGKey(1), jax.random.PRNGKey(2)
  a, b, c = _vjp(spec, x, w, dy, k1), _vjp(spec, x, w, dy, k1), _vjp(spec, x, w, dy, k2)
  for u, v, z in zip(a, b, c):
    assert _bits_equal(u, v)              # same key, same result
    assert not _bits_equal(u, z)          # another key, other bits
  # Every (role, operand) draws its own bits: fwd and backward are independent.
  streams = [np.asarray(operand_bits(k1, r, o, (16, 64))) for r in range(3) for o in range(2)]
  for i in range(len(streams)):
    for j in range(i):
      assert np.mean(streams[i] == streams[j]) < 1e-2
  # Typed keys work as well.
  _vjp(spec, x, w, dy, jax.random.key(0))


def test_errors():
  spec = DotSpec(*(GemmSpec("bfp4", "bfp4", "nearest_even", "stochastic"),) * 3)
  x, w = jnp.ones((4, 8)), jnp.ones((8, 3))
  with pytest.raises(ValueError, match="key"):
    quantized_dot_general(spec)(x, w, DENSE_DN)
  ne = quantized_dot_general(DotSpec(*(GemmSpec("bfp4", "bfp4"),) * 3))
  assert ne(x, w, DENSE_DN).shape == (4, 3)          # no key needed without stochastic
  with pytest.raises(ValueError, match="batch dim"):
    ne(jnp.ones((2, 4, 8)), jnp.ones((2, 8, 3)), (((2,), (1,)), ((0,), (0,))))
  with pytest.raises(ValueError, match="float32"):
    ne(x.astype(jnp.bfloat16), w, DENSE_DN)
  with pytest.raises(ValueError, match="differ in size"):
    ne(x, jnp.ones((7, 3)), DENSE_DN)
  with pytest.raises(ValueError, match="exact"):
    DotSpec(fwd=GemmSpec("mxfp8_e4m3", "mxfp8_e4m3"), datapath="exact")
  with pytest.raises(ValueError, match="block size"):
    DotSpec(fwd=GemmSpec("bfp8_b32", "bfp8_b64"), datapath="exact")
  with pytest.raises(ValueError, match="datapath"):
    DotSpec(datapath="approx")
  with pytest.raises(ValueError, match="format"):
    GemmSpec("bfp99", "fp32")
  with pytest.raises(ValueError, match="rounding"):
    GemmSpec("bfp8", "bfp8", "round_up")
