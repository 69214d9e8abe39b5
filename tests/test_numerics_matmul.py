"""The exact HBFP GEMM datapath (contract §5) against the independent reference, the fake
path, and matmul's argument checking."""

import pathlib
import sys
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from coltrain.numerics import check_exact_config, matmul, parse_format, quantize

sys.path.insert(0, str(pathlib.Path(__file__).parent))
import numerics_reference as ref  # noqa: E402

TINY = 2.0**-126


def f32(v):
  return np.asarray(v, np.float32)


def as_bits(x):
  return np.asarray(x, np.float32).view(np.uint32)


def rand_values(rng, shape, spread=6, specials=0.0):
  x = rng.standard_normal(shape) * 2.0 ** rng.integers(-spread, spread + 1, shape)
  x = f32(x)
  if specials:
    pick = rng.random(shape) < specials
    x[pick] = rng.choice(f32([np.nan, np.inf, -np.inf, 1e-40, 0.0]), pick.sum())
  return x


def rand_bits(rng, shape):
  return rng.integers(0, 2**32, shape, dtype=np.uint64).astype(np.uint32)


def check(a, b, lhs, rhs, rounding="nearest_even", bits=None):
  """coltrain exact == reference; returns coltrain's result."""
  a, b = f32(a), f32(b)
  kw = {} if bits is None else {"random_bits": tuple(jnp.asarray(t) for t in bits)}
  got = np.asarray(matmul(jnp.asarray(a), jnp.asarray(b), lhs=lhs, rhs=rhs,
                          rounding=rounding, **kw))
  want = ref.matmul_exact(as_bits(a), as_bits(b), lhs, rhs, rounding,
                          *(bits if bits is not None else (None, None)))
  ok = ref.contract_equal(as_bits(got), want)
  assert ok.all(), (lhs, rhs, got[~ok], want.view(np.float32)[~ok])
  return got


@pytest.mark.parametrize("lhs, rhs", [
    ("bfp8_b4", "bfp8_b4"), ("bfp4_b3", "bfp6_b3"), ("bfp2_b5", "bfp2_b5"),
    ("bfp12_b8", "bfp12_b8"),   # int32 path: 8 * 2047^2 >= 2^24
    ("bfp10_b16", "bfp9_b16"),  # float32 path: 16*511*255 < 2^24
    ("bfp16_b2", "bfp14_b2"),   # int32 path, products above 2^24 round
    ("bfp24_b1", "bfp8_b1"),    # int32 path, one-element blocks
    ("mxint8_b4", "bfp8_b4"),
])
@pytest.mark.parametrize("rounding", ["nearest_even", "stochastic", "toward_zero"])
def test_random_vs_reference(lhs, rhs, rounding):
  rng = np.random.default_rng(zlib.crc32(f"{lhs}{rhs}{rounding}".encode()))
  a = rand_values(rng, (3, 13), specials=0.04)
  b = rand_values(rng, (13, 4), specials=0.04)
  bits = (rand_bits(rng, a.shape), rand_bits(rng, b.shape)) if rounding == "stochastic" \
      else None
  check(a, b, lhs, rhs, rounding, bits)


def test_batched_matches_per_matrix():
  rng = np.random.default_rng(1)
  a = rand_values(rng, (2, 3, 2, 9), specials=0.02)
  b = rand_values(rng, (9, 3))
  got = check(a, b, "bfp5_b4", "bfp7_b4")
  assert got.shape == (2, 3, 2, 3)
  for i in range(2):
    for j in range(3):
      one = np.asarray(matmul(jnp.asarray(a[i, j]), jnp.asarray(b), lhs="bfp5_b4",
                              rhs="bfp7_b4"))
      np.testing.assert_array_equal(as_bits(one), as_bits(got[i, j]))


def test_nonfinite_blocks_give_nan_only_where_used():
  a = f32(np.ones((2, 8)))
  b = f32(np.ones((8, 2)))
  a[0, 1] = np.nan   # block 0 of row 0
  b[6, 1] = np.inf   # block 1 of column 1
  got = check(a, b, "bfp8_b4", "bfp8_b4")
  assert np.isnan(got[0]).all() and np.isnan(got[1, 1]) and got[1, 0] == 8.0


def test_inf_minus_inf_and_overflow():
  big = 2.0**127
  # v_0 = 1.5 * 2^127 and v_1 = 1.5 * 2^127: the float32 sum overflows to +inf
  a = f32([[1.5 * big, 1.5 * big], [1.5 * big, -1.5 * big]])
  b = f32([[1.0], [1.0]])
  got = check(a, b, "bfp8_b1", "bfp8_b1")
  assert got[0, 0] == np.inf and got[1, 0] == 0.0
  # a block product of exactly 2^128 is inf; just below stays finite
  a = f32([[big, big]])
  b = f32([[2.0, 1.984375], [0.0, 0.0]])
  got = check(a, b, "bfp8_b1", "bfp8_b1")
  assert got[0, 0] == np.inf and got[0, 1] == np.float32(127 * 2.0**121)
  # a single block product beyond 2^128 is inf; inf + (-inf) = NaN
  a = f32([[big, big, -big, -big]])
  b = f32([[big], [big], [big], [big]])
  got = check(a, b, "bfp8_b2", "bfp8_b2")
  assert np.isnan(got[0, 0])


def test_ftz_of_block_products_and_partial_sums():
  # v_k = P * 2^(Ea + Eb - 12) far below 2^-126 -> 0
  a = f32([[2.0**-100, 2.0**-100]])
  b = f32([[2.0**-100], [2.0**-100]])
  assert check(a, b, "bfp8_b1", "bfp8_b1")[0, 0] == 0
  # v_k exactly 2^-127 (biased exponent 0 after scaling) -> 0; 2^-126 stays
  a = f32([[TINY, TINY]])
  b = f32([[0.5, 0.0], [0.0, 1.0]])
  got = check(a, b, "bfp8_b1", "bfp8_b1")
  assert got[0, 0] == 0 and got[0, 1] == np.float32(TINY)
  # partial sum 1.5*2^-126 - 2^-126 = 2^-127 is subnormal -> FTZ -> 0, then + 2^-126
  a = f32([[1.5 * TINY, -TINY, TINY]])
  b = f32([[1.0], [1.0], [1.0]])
  got = check(a, b, "bfp8_b1", "bfp8_b1")
  assert got[0, 0] == np.float32(TINY)  # without FTZ it would be 1.5 * 2^-126
  # a block product just below 2^-126 that rounds (RNE at 24 bits) up to 2^-126 survives:
  # rounding comes before FTZ. qa = [2^22, 47127] (bfp24), qb = [7, 89] (bfp8):
  # P = 2^22 * 7 + 47127 * 89 = 2^25 - 1 and v = P * 2^(Ea + Eb - 22 - 6) = (2^25-1) 2^-151.
  ea, eb = -60, -63
  a = f32([[2.0**ea, 47127 * 2.0**(ea - 22)]])
  b = f32([[7 * 2.0**(eb - 6)], [89 * 2.0**(eb - 6)]])
  got = check(a, b, "bfp24_b2", "bfp8_b2")
  assert got[0, 0] == np.float32(TINY)


def test_int_to_float_rounding_of_large_products():
  """P_k > 2^24 rounds to nearest even once (§5 step 2), before scaling."""
  # bfp14: amax 1.0 -> step 2^-12; q = [4096, 1] and [4096, t]: P = 2^24 + t
  for t in (1, 3, 5, 7):
    a = f32([[1.0, 2.0**-12]])
    b = f32([[1.0], [t * 2.0**-12]])
    got = check(a, b, "bfp14_b2", "bfp14_b2")
    p = 2**24 + t
    rne = (p >> 1) + ((p & 1) and ((p >> 1) & 1))  # ties to even at 2^24 spacing 2
    assert got[0, 0] == np.float32(2 * rne * 2.0**-24)


@pytest.mark.parametrize("lhs, rhs", [("bfp12_b8", "bfp12_b8"), ("bfp16_b4", "bfp11_b4"),
                                      ("bfp10_b64", "bfp10_b64")])
def test_block_products_beyond_2pow24_are_exact(lhs, rhs):
  """Full-scale mantissas: block products need more than 24 bits, so a float32 dot (even
  one accumulating in any order) would round them; the datapath must not."""
  rng = np.random.default_rng(7)
  k = parse_format(lhs).block_size
  sign = lambda s: np.where(rng.random(s) < 0.1, -1, 1)
  a = f32(sign((12, k)) * rng.uniform(1, 2, (12, k)))
  b = f32(rng.uniform(1, 2, (k, 12)))
  got = check(a, b, lhs, rhs)
  qa = np.asarray(quantize(jnp.asarray(a), lhs, axis=-1), np.float64)
  qb = np.asarray(quantize(jnp.asarray(b), rhs, axis=0), np.float64)
  exact = qa @ qb  # float64 holds these sums exactly (< 2^53)
  assert np.all(got == exact.astype(np.float32))  # one rounding of the exact value


def test_accumulation_is_ordered_not_pairwise():
  """acc = ((v0 + v1) + v2) + ...: 1 + 2^-24 + 2^-24 = 1 under RNE, not 1 + 2^-23."""
  a = f32([[1.0, 2.0**-24, 2.0**-24, 2.0**-24]])
  b = f32(np.ones((4, 1)))
  got = check(a, b, "bfp8_b1", "bfp8_b1")
  assert got[0, 0] == 1.0
  a = f32([[2.0**-24, 2.0**-24, 2.0**-24, 1.0]])
  got = check(a, b, "bfp8_b1", "bfp8_b1")
  assert got[0, 0] == np.float32(1 + 2.0**-22)


def test_short_last_block_and_k_not_multiple():
  rng = np.random.default_rng(2)
  for k in (1, 5, 11):
    check(rand_values(rng, (2, k)), rand_values(rng, (k, 3)), "bfp6_b4", "bfp6_b4")


def test_empty_shapes():
  for lead, k, n in [((2,), 0, 3), ((0,), 5, 3), ((2, 0), 5, 3), ((2,), 5, 0)]:
    a, b = jnp.ones(lead + (k,), jnp.float32), jnp.ones((k, n), jnp.float32)
    for datapath, backend in (("exact", "jax"), ("fake", "jax"), ("exact", "hw")):
      got = matmul(a, b, lhs="bfp8_b4", rhs="bfp8_b4", datapath=datapath, backend=backend)
      assert got.shape == lead + (n,) and np.all(np.asarray(got) == 0)


def test_key_stochastic_is_deterministic_and_jittable():
  rng = np.random.default_rng(3)
  a, b = jnp.asarray(rand_values(rng, (4, 16))), jnp.asarray(rand_values(rng, (16, 5)))
  fn = jax.jit(lambda a, b, k: matmul(a, b, lhs="bfp4_b8", rhs="bfp4_b8",
                                      rounding="stochastic", key=k))
  k = jax.random.key(0)
  eager = matmul(a, b, lhs="bfp4_b8", rhs="bfp4_b8", rounding="stochastic", key=k)
  np.testing.assert_array_equal(as_bits(fn(a, b, k)), as_bits(eager))
  assert not np.array_equal(fn(a, b, jax.random.key(1)), eager)


def test_jit_and_disable_jit_agree():
  rng = np.random.default_rng(4)
  a = rand_values(rng, (5, 24), spread=60, specials=0.01)
  b = rand_values(rng, (24, 6), spread=60)
  base = as_bits(matmul(jnp.asarray(a), jnp.asarray(b), lhs="bfp8_b8", rhs="bfp8_b8"))
  with jax.disable_jit():
    eager = matmul(jnp.asarray(a), jnp.asarray(b), lhs="bfp8_b8", rhs="bfp8_b8")
  np.testing.assert_array_equal(as_bits(eager), base)
  assert ref.contract_equal(base, ref.matmul_exact(as_bits(a), as_bits(b), "bfp8_b8",
                                                   "bfp8_b8")).all()


def test_fake_datapath_is_quantize_then_matmul():
  rng = np.random.default_rng(5)
  a = jnp.asarray(rand_values(rng, (2, 3, 20)))
  b = jnp.asarray(rand_values(rng, (20, 4)))
  for lhs, rhs in [("bfp8_b8", "bfp4_b8"), ("mxfp8_e4m3", "mxfp4_e2m1_b4"),
                   ("fp32", "bfp6_b16")]:
    got = matmul(a, b, lhs=lhs, rhs=rhs, datapath="fake")
    want = jnp.matmul(quantize(a, lhs, axis=-1), quantize(b, rhs, axis=0),
                      precision=jax.lax.Precision.HIGHEST)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  # fake and exact agree closely (same quantized values, different accumulation)
  exact = matmul(a, b, lhs="bfp8_b8", rhs="bfp8_b8")
  fake = matmul(a, b, lhs="bfp8_b8", rhs="bfp8_b8", datapath="fake")
  np.testing.assert_allclose(np.asarray(exact), np.asarray(fake), rtol=1e-5, atol=1e-5)


def test_exact_close_to_float_matmul():
  rng = np.random.default_rng(6)
  a = rng.standard_normal((16, 64)).astype(np.float32)
  b = rng.standard_normal((64, 8)).astype(np.float32)
  got = np.asarray(matmul(jnp.asarray(a), jnp.asarray(b), lhs="bfp16_b16",
                          rhs="bfp12_b16"))
  np.testing.assert_allclose(got, a.astype(np.float64) @ b, rtol=0, atol=0.05)


def test_overflow_rejection():
  # bound = b * qmax_a * qmax_b must stay below 2^31
  check_exact_config(parse_format("bfp16_b2"), parse_format("bfp16_b2"))  # 2 * 32767^2 ok
  with pytest.raises(ValueError, match="2\\^31"):
    check_exact_config(parse_format("bfp16_b3"), parse_format("bfp16_b3"))
  a, b = jnp.ones((2, 64), jnp.float32), jnp.ones((64, 2), jnp.float32)
  with pytest.raises(ValueError, match="overflows the int32"):
    matmul(a, b, lhs="bfp16_b64", rhs="bfp16_b64")
  with pytest.raises(ValueError, match="2\\^31"):
    matmul(a, b, lhs="bfp24_b1", rhs="bfp10_b1")  # 1 * (2^23-1) * 511 >= 2^31
  # just below the bound is accepted and exact even when every product is maximal
  below2 = np.nextafter(np.float32(2), np.float32(0))
  check(np.full((1, 2), -below2), np.full((2, 1), -below2), "bfp24_b2", "bfp8_b2")
  check(np.full((1, 1), below2), np.full((1, 1), -below2), "bfp24_b1", "bfp9_b1")
  # the fake path has no integer accumulator and accepts it
  matmul(a, b, lhs="bfp16_b64", rhs="bfp16_b64", datapath="fake")


def test_argument_errors():
  a, b = jnp.ones((2, 8), jnp.float32), jnp.ones((8, 3), jnp.float32)
  with pytest.raises(ValueError, match="unknown matmul backend 'tpu'"):
    matmul(a, b, lhs="bfp8_b4", rhs="bfp8_b4", backend="tpu")
  with pytest.raises(ValueError, match="backend='hw' runs the exact datapath"):
    matmul(a, b, lhs="bfp8_b4", rhs="bfp8_b4", datapath="fake", backend="hw")
  with pytest.raises(ValueError, match="datapath"):
    matmul(a, b, lhs="bfp8_b4", rhs="bfp8_b4", datapath="approx")
  with pytest.raises(ValueError, match="bfp formats"):
    matmul(a, b, lhs="mxfp8_e4m3", rhs="bfp8_b4")
  with pytest.raises(ValueError, match="bfp formats"):
    matmul(a, b, lhs="fp32", rhs="bfp8_b4")
  with pytest.raises(ValueError, match="same block size"):
    matmul(a, b, lhs="bfp8_b4", rhs="bfp8_b8")
  with pytest.raises(ValueError, match="contraction"):
    matmul(a, jnp.ones((7, 3), jnp.float32), lhs="bfp8_b4", rhs="bfp8_b4")
  with pytest.raises(ValueError, match="shape"):
    matmul(a[0], b, lhs="bfp8_b4", rhs="bfp8_b4")
  with pytest.raises(ValueError, match="rounding"):
    matmul(a, b, lhs="bfp8_b4", rhs="bfp8_b4", rounding="up")
  with pytest.raises(ValueError, match="exactly one"):
    matmul(a, b, lhs="bfp8_b4", rhs="bfp8_b4", rounding="stochastic")
  with pytest.raises(ValueError, match="uint32"):
    matmul(a, b, lhs="bfp8_b4", rhs="bfp8_b4", rounding="stochastic",
           random_bits=(jnp.zeros((2, 8), jnp.uint32), jnp.zeros((3, 8), jnp.uint32)))
  with pytest.raises(ValueError, match="float32"):
    matmul(np.ones((2, 8)), b, lhs="bfp8_b4", rhs="bfp8_b4")
