"""Quantizers (contract §0-§4) against the independent reference on targeted cases, the
bfp integer encoding, input validation and stochastic-rounding statistics."""

import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from coltrain.numerics import BFPBlocks, bfp_decode, bfp_encode, parse_format, quantize

sys.path.insert(0, str(pathlib.Path(__file__).parent))
import numerics_reference as ref  # noqa: E402

TINY = 2.0**-126  # smallest normal float32
SUB = np.float32(1e-40)  # a subnormal
NAN, INF = np.float32(np.nan), np.float32(np.inf)
BELOW2 = np.nextafter(np.float32(2), np.float32(0))  # 2 - 2^-23
MAXF = np.finfo(np.float32).max
ROUNDINGS = ["nearest_even", "toward_zero", "stochastic"]


def f32(values) -> np.ndarray:
  return np.asarray(values, np.float32)


def as_bits(x) -> np.ndarray:
  return np.asarray(x, np.float32).view(np.uint32)


def check(x, fmt, axis=-1, rounding="nearest_even", random_bits=None):
  """coltrain == reference (contract equality); returns coltrain's float32 result."""
  x = f32(x)
  kw = {} if random_bits is None else {"random_bits": jnp.asarray(random_bits)}
  got = np.asarray(quantize(jnp.asarray(x), fmt, axis=axis, rounding=rounding, **kw))
  want = ref.quantize(as_bits(x), fmt, axis, rounding, random_bits)
  ok = ref.contract_equal(as_bits(got), want)
  assert ok.all(), (fmt, rounding, x[~ok], got[~ok], want.view(np.float32)[~ok])
  return got


def rand_bits(shape, seed=0):
  return np.random.default_rng(seed).integers(0, 2**32, shape, dtype=np.uint64).astype(
      np.uint32)


# ---------------------------------------------------------------------------- targeted

STEP8 = 2.0**-6  # bfp8 step for a block whose amax is in [1, 2)
TIES = f32([1.0, 0.5 * STEP8, 1.5 * STEP8, 2.5 * STEP8, -0.5 * STEP8, -3.5 * STEP8,
            1 + 0.5 * STEP8, 1 + 1.5 * STEP8])

TARGETED = {
    "ties": TIES,
    "saturate_up": f32([BELOW2, 0.1, -BELOW2, 1.0, 1.9921875, 1.99, -1.995, 0.0]),
    "pow2_amax": f32([2.0, 0.3, -0.7, 1.0, 4.0, -0.1, 2**-20, 3.0]),
    "below_pow2_amax": f32([BELOW2, 0.3, -0.7, 1.0, np.nextafter(np.float32(1), 0), -0.5,
                            0.25, 0.125]),
    "zeros": f32([0.0, -0.0, 0.0, 0.0, 0.0, 0.0, -0.0, 0.0]),
    "daz": f32([SUB, -SUB, 2.0**-149, 0.0, SUB, TINY, -1.5 * TINY, SUB]),
    "tiny_normals": f32([TINY, 1.5 * TINY, -TINY, 2 * TINY, 3 * TINY, 0, 1.75 * TINY, SUB]),
    "huge": f32([MAXF, -MAXF, 2.0**127, 1.0, 3e38, -2e38, 1e30, 0.0]),
    "nan": f32([1.0, NAN, 2.0, 3.0, 1.0, 2.0, 3.0, 4.0]),
    "inf": f32([1.0, 2.0, INF, 3.0, -INF, 2.0, 3.0, 4.0]),
    "mixed_scale": f32([1e-3, 7.0, -1e-8, 6.5, 0.7, -3.2, 5.9, 2.5]),
}


@pytest.mark.parametrize("case", sorted(TARGETED))
@pytest.mark.parametrize("fmt", ["bfp8_b4", "bfp4_b4", "bfp2_b3", "bfp16_b8", "bfp24_b4",
                                 "mxint8_b4", "mxfp8_e4m3_b4", "mxfp8_e5m2_b8",
                                 "mxfp6_e3m2_b4", "mxfp6_e2m3_b3", "mxfp4_e2m1_b4"])
@pytest.mark.parametrize("rounding", ROUNDINGS)
def test_targeted_vs_reference(case, fmt, rounding):
  x = TARGETED[case]
  rb = rand_bits(x.shape, seed=len(case)) if rounding == "stochastic" else None
  check(x, fmt, rounding=rounding, random_bits=rb)


def test_ties_go_to_even():
  got = check(TIES, "bfp8_b8")
  q = got / STEP8
  assert np.all(q == np.round(q))  # on the grid
  # every tie x/step = k + 1/2 went to the even neighbour (no saturation in this block)
  y = TIES / STEP8
  tie = (y - np.floor(y)) == 0.5
  assert tie.sum() == 7 and np.all(q[tie] % 2 == 0)
  # ... whereas toward_zero truncates the magnitude
  tz = check(TIES, "bfp8_b8", rounding="toward_zero") / STEP8
  assert np.all(np.abs(tz[tie]) == np.floor(np.abs(y[tie])))


def test_saturation_to_qmax():
  x = f32([BELOW2, 0.5, -BELOW2, 1.0])
  got = check(x, "bfp4_b4")  # E = 0, step 2^-2, 7.99.. rounds to 8 -> saturates to 7
  assert got[0] == 7 * 0.25 and got[2] == -7 * 0.25
  assert got.max() <= parse_format("bfp4").qmax * 0.25


def test_power_of_two_amax_is_exact():
  """Unlike HBFPEmulator, a block whose amax is a power of two keeps it exactly."""
  for m in (2, 3, 8, 16):
    x = f32([4.0, 1.0, -2.0, 0.5])
    got = check(x, f"bfp{m}_b4")
    assert got[0] == 4.0


def test_nonfinite_blocks_are_nan_and_isolated():
  x = f32([[1.0, NAN, 2.0, 3.0, 1.0, 2.0, 3.0, 4.0],
           [INF, 1.0, 1.0, 1.0, 0.5, 0.5, 0.5, 0.5],
           [0.0, 0.0, 0.0, -INF, 0.0, 0.0, 0.0, 0.0]])
  for fmt in ["bfp8_b4", "mxfp8_e4m3_b4", "mxint8_b4"]:
    got = check(x, fmt)
    assert np.isnan(got[:, :4]).all()
    assert not np.isnan(got[:, 4:]).any()


def test_zero_block_and_daz():
  x = f32([0.0, -0.0, SUB, -SUB, SUB, 1.0, 0.5, 0.25])
  for fmt in ["bfp8_b4", "mxfp4_e2m1_b4", "fp32"]:
    got = check(x, fmt)
    assert np.all(got[:5] == 0)
  # a subnormal never becomes a block's amax: the block of [SUB, TINY] has amax TINY
  got = check(f32([SUB, TINY]), "bfp8_b2")
  assert got[1] == np.float32(TINY) and got[0] == 0


def test_fp32_is_identity_except_daz():
  x = np.concatenate([as_bits(f32([1.0, -2.5, INF, -INF, 0.0, -0.0, MAXF, TINY])),
                      np.array([0x7FC00001, 0xFFBFFFFF, 0x00000001, 0x807FFFFF], np.uint32)])
  got = as_bits(quantize(jnp.asarray(x.view(np.float32)), "fp32"))
  np.testing.assert_array_equal(got[:10], x[:10])  # NaN payloads kept bit for bit
  np.testing.assert_array_equal(got[10:], x[10:] & 0x80000000)  # subnormals -> signed 0


def test_short_last_block_equals_zero_padding():
  rng = np.random.default_rng(3)
  x = f32(rng.standard_normal((3, 10)) * 2.0 ** rng.integers(-5, 5, (3, 10)))
  padded = np.concatenate([x, np.zeros((3, 2), np.float32)], axis=1)
  for fmt in ["bfp5_b4", "mxfp6_e2m3_b4", "mxint8_b3"]:
    for rounding in ROUNDINGS:
      rb = rand_bits(padded.shape, 1) if rounding == "stochastic" else None
      kw = {} if rb is None else {"random_bits": jnp.asarray(rb[:, :10])}
      kwp = {} if rb is None else {"random_bits": jnp.asarray(rb)}
      got = np.asarray(quantize(jnp.asarray(x), fmt, rounding=rounding, **kw))
      full = np.asarray(quantize(jnp.asarray(padded), fmt, rounding=rounding, **kwp))
      np.testing.assert_array_equal(as_bits(got), as_bits(full[:, :10]))
      check(x, fmt, rounding=rounding, random_bits=None if rb is None else rb[:, :10])


def test_axis_other_than_last():
  rng = np.random.default_rng(4)
  x = f32(rng.standard_normal((5, 6, 7)) * 2.0 ** rng.integers(-8, 8, (5, 6, 7)))
  x[1, 2, 3] = np.nan
  for axis in (0, 1, -2, 2):
    for fmt in ["bfp6_b4", "mxfp8_e5m2_b3"]:
      got = check(x, fmt, axis=axis)
      moved = np.moveaxis(x, axis, -1)
      same = np.moveaxis(np.asarray(quantize(jnp.asarray(np.ascontiguousarray(moved)), fmt)),
                         -1, axis)
      np.testing.assert_array_equal(as_bits(got), as_bits(same))


@pytest.mark.parametrize("block", [17, 32, 33, 64, 100, 257])
def test_wide_blocks(block):
  """Wide and odd block sizes (the block max is computed by folding for b > 32)."""
  rng = np.random.default_rng(block)
  x = f32(rng.standard_normal((3, 300)) * 2.0 ** rng.integers(-20, 20, (3, 300)))
  pos = rng.integers(0, 300, 3)
  x[0, pos[0]] = 1e30  # one dominant element somewhere in each row
  x[1, pos[1]] = -3e-30
  x[2, pos[2]] = np.nan
  for fmt in [f"bfp9_b{block}", f"mxfp6_e2m3_b{block}"]:
    check(x, fmt)
    check(x.T, fmt, axis=0)


def test_mx_scale_clamps_at_e8m0_min():
  """floor(log2(amax)) - emax_elem < -127 clamps the scale to 2^-127 (contract §3)."""
  x = f32([TINY, 1.5 * TINY, 3.75 * TINY, 1.25 * TINY])
  for fmt in ["mxfp8_e5m2_b4", "mxfp8_e4m3_b4", "mxfp4_e2m1_b4"]:
    for rounding in ROUNDINGS:
      check(x, fmt, rounding=rounding,
            random_bits=rand_bits(4, 2) if rounding == "stochastic" else None)


def test_mx_saturates_to_max_norm():
  for name, top in [("mxfp8_e4m3", 448 * 2.0**-8), ("mxfp4_e2m1", 6 * 2.0**-2),
                    ("mxfp6_e2m3", 7.5 * 2.0**-2), ("mxfp6_e3m2", 28 * 2.0**-4),
                    ("mxfp8_e5m2", 57344 * 2.0**-15)]:
    x = f32([BELOW2, -BELOW2, 1.0, 0.0])  # E = 0, scale 2^-emax_elem
    for rounding in ROUNDINGS:
      got = check(x, name + "_b4", rounding=rounding,
                  random_bits=rand_bits(4, 5) if rounding == "stochastic" else None)
      assert got[0] == np.float32(top) and got[1] == -np.float32(top)


# ------------------------------------------------------------------- stochastic threshold

def _threshold_bits(delta24: int):
  """Random words just at and just below the round-up threshold r >= 2^24 - delta24."""
  r_up = 2**24 - delta24
  words = [r_up << 8, (r_up << 8) | 0xFF]
  if r_up - 1 >= 0:
    words += [((r_up - 1) << 8) | 0xFF, (r_up - 1) << 8]
  return words


@pytest.mark.parametrize("fmt, amax, elem, delta24", [
    ("bfp4_b2", 1.0, 0.25 * 1.375, 0.375 * 2**24),         # delta = 3/8
    ("bfp4_b2", 1.0, 2.0**-26, 1),                          # delta = 2^-24: r = 2^24 - 1
    ("bfp4_b2", 1.0, 0.25 * (1 - 2.0**-24), 2**24 - 1),     # delta = 1 - 2^-24: r >= 1
    ("bfp8_b2", 1.5, -(1.0 + 0.75 * 2.0**-6), 0.75 * 2**24),
    ("mxfp4_e2m1_b2", 4.0, 2.5, 2**23),                     # between 2 and 3
    ("mxfp4_e2m1_b2", 4.0, 0.25, 2**23),                    # subnormal grid 0 / 0.5
    ("mxfp4_e2m1_b2", 4.0, -5.5, 0.75 * 2**24),             # between 4 and 6
    ("mxfp8_e4m3_b2", 256.0, 2.0**-9 * 1.25, 0.25 * 2**24),  # e4m3 subnormal step 2^-9
])
def test_stochastic_threshold(fmt, amax, elem, delta24):
  delta24 = int(delta24)
  words = _threshold_bits(delta24)
  x = f32([[amax, elem]] * len(words))
  rb = np.zeros(x.shape, np.uint32)
  rb[:, 1] = words
  got = check(x, fmt, rounding="stochastic", random_bits=rb)[:, 1]
  down = check(x, fmt, rounding="toward_zero")[:, 1]
  up_expected = np.array([True, True, False, False][:len(words)])
  rounded_up = np.abs(got) > np.abs(down)
  np.testing.assert_array_equal(rounded_up, up_expected)


def test_stochastic_never_rounds_up_below_2pow_minus24():
  # delta < 2^-24: delta * 2^24 < 1 <= 2^24 - r for every r, so never up.
  x = f32([[1.0, 2.0**-29 * 3]] * 2)  # step 2^-2: delta = 3 * 2^-27
  rb = np.array([[0, 0xFFFFFFFF], [0, 0xFFFFFF00]], np.uint32)
  got = check(x, "bfp4_b2", rounding="stochastic", random_bits=rb)
  assert np.all(got[:, 1] == 0)


def test_stochastic_key_is_unbiased():
  """E[Q(x)] = x: with a PRNG key, the mean error over many draws vanishes."""
  n = 1 << 16
  for fmt, amax, v in [("bfp4_b4", 1.0, 0.3), ("mxfp4_e2m1_b4", 4.0, 2.2),
                       ("bfp8_b4", 1.0, -0.0123)]:
    x = jnp.asarray(np.tile(f32([amax, v, v, v]), n))
    q = np.asarray(quantize(x, fmt, rounding="stochastic", key=jax.random.key(7)))
    vals = q.reshape(n, 4)[:, 1:].ravel().astype(np.float64)
    lo, hi = np.min(vals), np.max(vals)
    assert lo < np.float32(v) < hi and len(np.unique(vals)) == 2  # the two neighbours
    p = (np.float32(v) - lo) / (hi - lo)
    sigma = (hi - lo) * np.sqrt(p * (1 - p) / vals.size)
    err = vals.mean() - np.float64(np.float32(v))
    assert abs(err) < 5 * sigma, (fmt, err, sigma)  # 5 sigma: flaky with p < 1e-6
    nearest = np.asarray(quantize(x, fmt))[1]
    assert abs(nearest - np.float32(v)) > 10 * sigma  # nearest rounding is biased here
  # different keys give different draws; the same key the same draws
  k1 = quantize(x, "bfp4_b4", rounding="stochastic", key=jax.random.key(1))
  k1b = quantize(x, "bfp4_b4", rounding="stochastic", key=jax.random.key(1))
  k2 = quantize(x, "bfp4_b4", rounding="stochastic", key=jax.random.key(2))
  assert np.array_equal(k1, k1b) and not np.array_equal(k1, k2)


def test_key_equals_explicit_bits():
  x = jnp.asarray(f32(np.random.default_rng(0).standard_normal((4, 9))))
  key = jax.random.key(3)
  bits = jax.random.bits(key, x.shape, jnp.uint32)
  a = quantize(x, "bfp5_b4", rounding="stochastic", key=key)
  b = quantize(x, "bfp5_b4", rounding="stochastic", random_bits=bits)
  np.testing.assert_array_equal(as_bits(a), as_bits(b))


# ---------------------------------------------------------------------------- encoding

def test_encode_layout_and_roundtrip():
  rng = np.random.default_rng(5)
  x = f32(rng.standard_normal((3, 10, 5)) * 2.0 ** rng.integers(-10, 10, (3, 10, 5)))
  x[0, 4, 0] = np.inf
  fmt = parse_format("bfp6_b4")
  enc = bfp_encode(jnp.asarray(x), fmt, axis=1)
  assert isinstance(enc, BFPBlocks)
  assert enc.mantissas.shape == (3, 5, 3, 4) and enc.mantissas.dtype == jnp.int32
  assert enc.exponents.shape == (3, 5, 3) and enc.exponents.dtype == jnp.int32
  assert enc.nonfinite.shape == (3, 5, 3) and enc.nonfinite.dtype == jnp.bool_
  m = np.asarray(enc.mantissas)
  assert np.abs(m).max() <= fmt.qmax
  assert np.all(m[..., 2, 2:] == 0)  # padding of the short last block
  assert np.asarray(enc.nonfinite)[0, 0, 1] and np.asarray(enc.nonfinite).sum() == 1
  assert np.all(m[0, 0, 1] == 0) and np.asarray(enc.exponents)[0, 0, 1] == 0
  e = np.asarray(enc.exponents)
  assert e.min() >= -126 and e.max() <= 127
  dec = bfp_decode(enc, fmt, axis=1, length=10)
  np.testing.assert_array_equal(as_bits(dec), as_bits(quantize(jnp.asarray(x), fmt, axis=1)))
  # narrow storage is lossless: int8 for m <= 8
  narrow = BFPBlocks(enc.mantissas.astype(jnp.int8), enc.exponents.astype(jnp.int8),
                     enc.nonfinite)
  np.testing.assert_array_equal(as_bits(bfp_decode(narrow, fmt, axis=1, length=10)),
                                as_bits(dec))


@pytest.mark.parametrize("case", sorted(TARGETED))
@pytest.mark.parametrize("m", [2, 5, 8, 13, 24])
def test_encode_vs_reference(case, m):
  x = TARGETED[case]
  enc = bfp_encode(jnp.asarray(x), f"bfp{m}_b4")
  xb = as_bits(x).reshape(-1, 4)
  for k in range(xb.shape[0]):
    q, e, nf = ref.bfp_encode_block([int(v) for v in xb[k]], m, "nearest_even", [0] * 4)
    assert bool(enc.nonfinite[k]) == nf
    if not nf:
      assert list(np.asarray(enc.mantissas[k])) == q and int(enc.exponents[k]) == e


def test_decode_default_length_keeps_padding():
  x = jnp.asarray(f32([1.0, 2.0, 3.0, 4.0, 5.0]))
  enc = bfp_encode(x, "bfp8_b4")
  assert bfp_decode(enc, "bfp8_b4").shape == (8,)
  assert bfp_decode(enc, "bfp8_b4", length=5).shape == (5,)


# ---------------------------------------------------------------------------- jit/vmap

def test_jit_vmap_eager_agree():
  rng = np.random.default_rng(6)
  x = f32(rng.standard_normal((6, 20)) * 2.0 ** rng.integers(-130, 120, (6, 20)))
  x[2, 3] = np.nan
  rb = jnp.asarray(rand_bits(x.shape, 9))
  for fmt in ["bfp7_b8", "mxfp6_e3m2_b8"]:
    base = as_bits(quantize(jnp.asarray(x), fmt, rounding="stochastic", random_bits=rb))
    jitted = jax.jit(lambda x, r: quantize(x, fmt, rounding="stochastic", random_bits=r))
    vm = jax.vmap(lambda x, r: quantize(x, fmt, rounding="stochastic", random_bits=r))
    with jax.disable_jit():
      eager = quantize(jnp.asarray(x), fmt, rounding="stochastic", random_bits=rb)
    for other in (jitted(x, rb), vm(jnp.asarray(x), rb), eager):
      np.testing.assert_array_equal(as_bits(other), base)


def test_widening_half_precision_inputs():
  x = np.random.default_rng(0).standard_normal(16).astype(np.float16)
  np.testing.assert_array_equal(
      as_bits(quantize(jnp.asarray(x), "bfp4_b8")),
      as_bits(quantize(jnp.asarray(x.astype(np.float32)), "bfp4_b8")))


# ---------------------------------------------------------------------------- errors

def test_errors():
  x = jnp.ones((4, 8), jnp.float32)
  with pytest.raises(ValueError, match="rounding"):
    quantize(x, "bfp8", rounding="nearest")
  with pytest.raises(ValueError, match="exactly one"):
    quantize(x, "bfp8", rounding="stochastic")
  with pytest.raises(ValueError, match="exactly one"):
    quantize(x, "bfp8", rounding="stochastic", random_bits=jnp.zeros((4, 8), jnp.uint32),
             key=jax.random.key(0))
  with pytest.raises(ValueError, match="uint32"):
    quantize(x, "bfp8", rounding="stochastic", random_bits=jnp.zeros((4, 8), jnp.int32))
  with pytest.raises(ValueError, match="shape"):
    quantize(x, "bfp8", rounding="stochastic", random_bits=jnp.zeros((8, 4), jnp.uint32))
  with pytest.raises(ValueError, match="only used by stochastic"):
    quantize(x, "bfp8", random_bits=jnp.zeros((4, 8), jnp.uint32))
  with pytest.raises(ValueError, match="float32"):
    quantize(np.ones((4, 8)), "bfp8")  # float64
  with pytest.raises(ValueError, match="float32"):
    quantize(jnp.ones((4, 8), jnp.int32), "bfp8")
  with pytest.raises(ValueError, match="float32"):
    quantize([1.0, 2.0], "bfp8")
  with pytest.raises(ValueError, match="axis"):
    quantize(x, "bfp8", axis=2)
  with pytest.raises(ValueError, match="axis"):
    quantize(x, "bfp8", axis=-3)
  with pytest.raises(ValueError, match="0-d"):
    quantize(jnp.float32(1.0), "bfp8")
  with pytest.raises(ValueError, match="accepted forms"):
    quantize(x, "bfp99")
  with pytest.raises(ValueError, match="bfp format"):
    bfp_encode(x, "mxfp8_e4m3")
  enc = bfp_encode(x, "bfp8_b4")
  with pytest.raises(ValueError, match="shape"):
    bfp_decode(enc, "bfp8_b8")
  with pytest.raises(ValueError, match="length"):
    bfp_decode(enc, "bfp8_b4", length=3)
