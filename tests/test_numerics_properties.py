"""Property tests (hypothesis): random float32 bit patterns including specials, random
shapes, blocks, axes, formats and rounding modes; coltrain against the independent
reference and against properties that follow from the contract."""

import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from coltrain.numerics import matmul, parse_format, quantize

sys.path.insert(0, str(pathlib.Path(__file__).parent))
import numerics_reference as ref  # noqa: E402

SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                      HealthCheck.data_too_large])

SPECIAL_BITS = [
    0x00000000, 0x80000000,              # ±0
    0x00000001, 0x807FFFFF, 0x00400000,  # subnormals (DAZ)
    0x00800000, 0x80800001,              # smallest normals
    0x7F800000, 0xFF800000,              # ±inf
    0x7FC00000, 0xFFC00001, 0x7F800001,  # NaNs (quiet, signalling)
    0x7F7FFFFF, 0xFF7FFFFF,              # ±max
    0x3F800000, 0x3FFFFFFF, 0x40000000,  # 1, just below 2, 2
]
MX_ELEMENTS = ["e4m3", "e5m2", "e3m2", "e2m3", "e2m1"]
ROUNDINGS = ["nearest_even", "toward_zero", "stochastic"]


@st.composite
def f32_arrays(draw, shape, specials=True):
  """uint32 bit patterns: mostly a narrow exponent window (so rounding is non-trivial,
  with short mantissas for exact ties), some raw 32-bit patterns and specials."""
  n = int(np.prod(shape))
  center = draw(st.integers(1, 254))
  narrow = st.builds(
      lambda s, de, f, keep: (s << 31) | (min(max(center + de, 1), 254) << 23)
      | (f & ~((1 << keep) - 1)),
      st.integers(0, 1), st.integers(-8, 2), st.integers(0, 2**23 - 1),
      st.sampled_from([0, 12, 18, 20, 22, 23]))
  options = [(8, narrow), (1, st.integers(0, 2**32 - 1))]
  if specials:
    options.append((1, st.sampled_from(SPECIAL_BITS)))
  elem = st.one_of(*[o for w, o in options for _ in range(w)])
  vals = draw(st.lists(elem, min_size=n, max_size=n))
  return np.array(vals, np.uint32).reshape(shape)


@st.composite
def formats(draw, kinds=("bfp", "mx", "mxint")):
  kind = draw(st.sampled_from(kinds))
  block = draw(st.integers(1, 9))
  if kind == "bfp":
    return f"bfp{draw(st.integers(2, 24))}_b{block}"
  if kind == "mxint":
    return f"mxint8_b{block}"
  el = draw(st.sampled_from(MX_ELEMENTS))
  bits = {"e4m3": 8, "e5m2": 8, "e3m2": 6, "e2m3": 6, "e2m1": 4}[el]
  return f"mxfp{bits}_{el}_b{block}"


@st.composite
def quantize_cases(draw, kinds=("bfp", "mx", "mxint"), roundings=ROUNDINGS,
                   specials=True):
  shape = tuple(draw(st.lists(st.integers(1, 6), min_size=1, max_size=3)))
  x = draw(f32_arrays(shape, specials))
  axis = draw(st.integers(-len(shape), len(shape) - 1))
  rounding = draw(st.sampled_from(roundings))
  rb = None
  if rounding == "stochastic":
    rb = np.array(draw(st.lists(st.integers(0, 2**32 - 1), min_size=x.size,
                                max_size=x.size)), np.uint32).reshape(shape)
  return x, draw(formats(kinds)), axis, rounding, rb


def run(x_bits, fmt, axis, rounding, rb):
  kw = {} if rb is None else {"random_bits": jnp.asarray(rb)}
  out = quantize(jnp.asarray(x_bits.view(np.float32)), fmt, axis=axis, rounding=rounding,
                 **kw)
  return np.asarray(out).view(np.uint32)


@settings(max_examples=200, **SETTINGS)
@given(quantize_cases())
def test_quantize_matches_reference(case):
  x, fmt, axis, rounding, rb = case
  got = run(x, fmt, axis, rounding, rb)
  want = ref.quantize(x, fmt, axis, rounding, rb)
  ok = ref.contract_equal(got, want)
  assert ok.all(), (x[~ok], got[~ok], want[~ok])
  # no subnormal is ever produced (FTZ)
  assert not np.any(((got & 0x7F800000) == 0) & ((got & 0x7FFFFF) != 0))


@settings(max_examples=100, **SETTINGS)
@given(quantize_cases(roundings=("nearest_even", "toward_zero")))
def test_quantize_is_idempotent(case):
  x, fmt, axis, rounding, _ = case
  once = run(x, fmt, axis, rounding, None)
  twice = run(once, fmt, axis, rounding, None)
  assert ref.contract_equal(once, twice).all()


@settings(max_examples=150, **SETTINGS)
@given(quantize_cases(kinds=("bfp",), specials=False))
def test_bfp_error_bounds(case):
  """|Q(x) - x| <= step/2 (nearest_even, step when saturated), < step otherwise."""
  x_bits, fmt, axis, rounding, rb = case
  f = parse_format(fmt)
  q = run(x_bits, fmt, axis, rounding, rb).view(np.float32).astype(np.float64)
  x = x_bits.view(np.float32).astype(np.float64)
  x = np.where(np.abs(x) < 2.0**-126, 0.0, x)  # DAZ
  q, x = np.moveaxis(q, axis, -1), np.moveaxis(x, axis, -1)
  finite = np.isfinite(x)
  for idx in np.ndindex(x.shape[:-1]):
    for s in range(0, x.shape[-1], f.block_size):
      xb, qb = x[idx][s:s + f.block_size], q[idx][s:s + f.block_size]
      if not finite[idx][s:s + f.block_size].all():
        assert np.isnan(qb).all()
        continue
      amax = np.abs(xb).max()
      if amax == 0:
        assert (qb == 0).all()
        continue
      e = np.frexp(amax)[1] - 1  # floor(log2(amax)), exact for float64
      step = 2.0 ** (e - (f.mantissa_bits - 2))
      err = np.abs(qb - xb)
      assert np.all(qb / step == np.round(qb / step))  # on the grid
      assert np.all(np.abs(qb) <= f.qmax * step)
      saturated = np.abs(qb) == f.qmax * step
      if rounding == "nearest_even":
        assert np.all(err[~saturated] <= step / 2) and np.all(err <= step)
      else:
        assert np.all(err < step)
      if rounding == "toward_zero":
        assert np.all(np.abs(qb) <= np.abs(xb))


def _kw(r):
  return {} if r is None else {"random_bits": r}


@settings(max_examples=40, **SETTINGS)
@given(quantize_cases())
def test_jit_and_vmap_same_bits(case):
  x, fmt, axis, rounding, rb = case
  base = run(x, fmt, axis, rounding, rb)
  xj = jnp.asarray(x.view(np.float32))
  rbj = None if rb is None else jnp.asarray(rb)
  jitted = jax.jit(lambda x, r: quantize(x, fmt, axis=axis, rounding=rounding, **_kw(r)))
  np.testing.assert_array_equal(np.asarray(jitted(xj, rbj)).view(np.uint32), base)
  if x.ndim >= 2:
    ax = axis % x.ndim
    mapped_over = 0 if ax != 0 else 1
    inner_axis = ax - (1 if mapped_over < ax else 0)
    fn = jax.vmap(lambda x, r: quantize(x, fmt, axis=inner_axis, rounding=rounding,
                                        **_kw(r)),
                  in_axes=(mapped_over, None if rb is None else mapped_over),
                  out_axes=mapped_over)
    np.testing.assert_array_equal(np.asarray(fn(xj, rbj)).view(np.uint32), base)


# Op-by-op execution compiles every primitive separately: slow, so fewer examples.
@settings(max_examples=5, **SETTINGS)
@given(quantize_cases())
def test_disable_jit_same_bits(case):
  x, fmt, axis, rounding, rb = case
  base = run(x, fmt, axis, rounding, rb)
  with jax.disable_jit():
    eager = quantize(jnp.asarray(x.view(np.float32)), fmt, axis=axis, rounding=rounding,
                     **_kw(None if rb is None else jnp.asarray(rb)))
  np.testing.assert_array_equal(np.asarray(eager).view(np.uint32), base)


@st.composite
def matmul_cases(draw):
  block = draw(st.integers(1, 5))
  ma, mb = draw(st.integers(2, 16)), draw(st.integers(2, 16))
  if block * (2 ** (ma - 1) - 1) * (2 ** (mb - 1) - 1) >= 2**31:
    mb = 2
  m, k, n = draw(st.integers(1, 3)), draw(st.integers(1, 12)), draw(st.integers(1, 3))
  batch = draw(st.sampled_from([(), (2,)]))
  a = draw(f32_arrays(batch + (m, k)))
  b = draw(f32_arrays((k, n)))
  rounding = draw(st.sampled_from(ROUNDINGS))
  bits = None
  if rounding == "stochastic":
    bits = tuple(np.array(draw(st.lists(st.integers(0, 2**32 - 1), min_size=t.size,
                                        max_size=t.size)), np.uint32).reshape(t.shape)
                 for t in (a, b))
  return a, b, f"bfp{ma}_b{block}", f"bfp{mb}_b{block}", rounding, bits


@settings(max_examples=100, **SETTINGS)
@given(matmul_cases())
def test_exact_matmul_matches_reference(case):
  a, b, lhs, rhs, rounding, bits = case
  kw = {} if bits is None else {"random_bits": tuple(jnp.asarray(t) for t in bits)}
  got = np.asarray(matmul(jnp.asarray(a.view(np.float32)), jnp.asarray(b.view(np.float32)),
                          lhs=lhs, rhs=rhs, rounding=rounding, **kw)).view(np.uint32)
  want = ref.matmul_exact(a, b, lhs, rhs, rounding, *(bits or (None, None)))
  ok = ref.contract_equal(got, want)
  assert ok.all(), (got[~ok], want[~ok])
