"""The fast fake quantizer and the stochastic-rounding bits used by HBFP training.

`fakeq.fake_quantize` must equal `quantize.quantize` bit for bit (it is a re-formulation
for speed), and the exact datapath relies on bfp quantization being idempotent.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from coltrain.numerics.fakeq import fake_quantize
from coltrain.numerics.formats import parse_format
from coltrain.numerics.quantize import quantize
from coltrain.numerics.srbits import hash_bits


def _adversarial(rng, shape):
  """Random bit patterns mixed with scaled normals, zeros, subnormals, ties, inf/NaN."""
  x = rng.integers(0, 2**32, size=shape, dtype=np.uint64).astype(np.uint32).view(np.float32)
  k = rng.integers(0, 6, size=shape)
  scale = 2.0 ** rng.integers(-135, 120, size=shape[:-1] + (1,))
  with np.errstate(over="ignore"):
    normal = (rng.standard_normal(shape) * scale).astype(np.float32)
  x = np.where(k == 0, normal, x)
  x = np.where(k == 1, np.float32(0), x)
  x = np.where(k == 2, (rng.integers(-300, 300, shape) * 0.5).astype(np.float32), x)  # ties
  x = np.where(k == 3, np.float32(1e-39) * rng.integers(-5, 5, shape), x)             # subnormal
  x = np.where(k == 4, (rng.standard_normal(shape) * 1e-37).astype(np.float32), x)    # near 2^-126
  x = np.where((k == 5) & (rng.random(shape) < 0.01), np.float32(np.inf), x)
  return x.astype(np.float32)


def _same(a, b):
  a, b = np.asarray(a), np.asarray(b)
  return bool(np.all((a == b) | (np.isnan(a) & np.isnan(b))))


FORMATS = ["bfp8", "bfp4_b16", "bfp2_b3", "bfp16_b64", "bfp24_b5", "bfp12_b7", "mxint8",
           "mxfp4_e2m1_b8"]


@pytest.mark.parametrize("fmt", FORMATS)
def test_fake_quantize_equals_quantize(fmt):
  rng = np.random.default_rng(sum(map(ord, fmt)))
  f = parse_format(fmt)
  xs = [jnp.asarray(_adversarial(rng, shape)) for shape in [(7, 150), (3, 5, 40)]]
  bits = [jnp.asarray(rng.integers(0, 2**32, size=x.shape, dtype=np.uint64).astype(np.uint32))
          for x in xs]
  cases = [(i, axis, rounding) for i, x in enumerate(xs) for axis in range(x.ndim)
           for rounding in ("nearest_even", "stochastic")]

  @jax.jit
  def both(xs, bits):  # one compile for every case
    out = []
    for i, axis, rounding in cases:
      b = bits[i] if rounding == "stochastic" else None
      out.append((fake_quantize(xs[i], f, axis, rounding, b),
                  quantize(xs[i], f, axis=axis, rounding=rounding, random_bits=b)))
    return out

  for case, (got, want) in zip(cases, both(xs, bits)):
    assert _same(got, want), (fmt, case)


def test_fake_quantize_eager_equals_jit():
  rng = np.random.default_rng(1)
  x = jnp.asarray(_adversarial(rng, (5, 100)))
  f = parse_format("bfp6_b32")
  assert _same(fake_quantize(x, f, 1), jax.jit(lambda x: fake_quantize(x, f, 1))(x))


@pytest.mark.parametrize("fmt", ["bfp8", "bfp4_b16", "bfp16_b64", "bfp13_b5", "mxint8"])
@pytest.mark.parametrize("rounding", ["nearest_even", "stochastic", "toward_zero"])
def test_bfp_quantization_is_idempotent(fmt, rounding):
  """The exact datapath pre-quantizes operands with their own rounding and lets
  `matmul(exact)` re-encode them with nearest_even; that is only the contract's GEMM if
  quantizing an already quantized tensor (with any rounding) changes nothing."""
  rng = np.random.default_rng(7)
  x = jnp.asarray(_adversarial(rng, (9, 200)))
  kw = {}
  if rounding == "stochastic":
    kw["key"] = jax.random.PRNGKey(3)
  q = quantize(x, fmt, axis=1, rounding=rounding, **kw)
  for r2 in ("nearest_even", "stochastic", "toward_zero"):
    kw2 = {"key": jax.random.PRNGKey(9)} if r2 == "stochastic" else {}
    assert _same(quantize(q, fmt, axis=1, rounding=r2, **kw2), q), r2


def test_hash_bits_deterministic_distinct_and_uniform():
  k0, k1 = jax.random.PRNGKey(0), jax.random.PRNGKey(1)
  a = np.asarray(hash_bits(k0, (64, 1000)))
  assert a.dtype == np.uint32 and a.shape == (64, 1000)
  assert np.array_equal(a, np.asarray(hash_bits(k0, (64, 1000))))
  b = np.asarray(hash_bits(k1, (64, 1000)))
  assert np.mean(a == b) < 1e-3
  assert len(np.unique(a)) == a.size            # a bijection of the element index
  # Top 24 bits (what stochastic rounding uses): uniform in 16 bins, chi-square test.
  top = (a >> 8).astype(np.float64) / 2**24
  counts = np.histogram(top, bins=16, range=(0, 1))[0]
  expected = a.size / 16
  chi2 = np.sum((counts - expected) ** 2 / expected)
  assert chi2 < 50, chi2                         # 15 dof: p < 1e-5
  # Each bit is set about half the time, and neighbours are uncorrelated.
  for bit in (8, 15, 23, 31):
    assert abs(np.mean((a >> bit) & 1) - 0.5) < 0.01
  corr = np.corrcoef(top.ravel()[:-1], top.ravel()[1:])[0, 1]
  assert abs(corr) < 0.01
  # Typed keys work too.
  assert hash_bits(jax.random.key(0), (3, 4)).shape == (3, 4)


def test_stochastic_rounding_with_hash_bits_is_unbiased():
  """E[quantize(x)] = x under stochastic rounding (up to sampling error)."""
  x = jnp.full((20000, 4), 1.0 + 2.0**-3 + 2.0**-5, jnp.float32)   # between bfp4 grid points
  x = x.at[:, 0].set(1.75)                                          # block max -> E = 0
  f = parse_format("bfp4_b4")
  bits = hash_bits(jax.random.PRNGKey(5), x.shape)
  q = np.asarray(fake_quantize(x, f, 1, "stochastic", bits))[:, 1:]
  assert set(np.unique(q)) <= {1.0, 1.25}
  assert abs(q.mean() - float(x[0, 1])) < 0.005
