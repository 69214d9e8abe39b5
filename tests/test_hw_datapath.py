"""The C++ datapath (hw/, backend="hw") against the pure-JAX implementation, bit for bit:
GEMM on every kernel and thread count, quantize, the bfp wire format and top_k."""

import json
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from coltrain.comm.compressors import bfp_pack, bfp_unpack, top_k_indices
from coltrain.numerics import hw, matmul, parse_format, quantize

sys.path.insert(0, str(pathlib.Path(__file__).parent))
import numerics_reference as ref  # noqa: E402

VECTORS = json.loads((pathlib.Path(__file__).parent / "data" / "numerics_vectors.json")
                     .read_text())["cases"]
KERNELS = ["reference", "avx2", "avx512"]


def rand_values(rng, shape, spread=6, specials=0.0):
  x = (rng.standard_normal(shape) * 2.0 ** rng.integers(-spread, spread + 1, shape))
  x = x.astype(np.float32)
  if specials:
    pick = rng.random(shape) < specials
    x[pick] = rng.choice(np.float32([np.nan, np.inf, -np.inf, 1e-40, 0.0, -0.0]),
                         pick.sum())
  return x


def rand_bits(rng, shape):
  return rng.integers(0, 2**32, shape, dtype=np.uint64).astype(np.uint32)


def assert_same_bits(got, want):
  got = np.asarray(got, np.float32).view(np.uint32)
  want = np.asarray(want, np.float32).view(np.uint32)
  ok = ref.contract_equal(got, want)
  assert ok.all(), (f"{(~ok).sum()} of {ok.size} differ, first at {np.argwhere(~ok)[0]}: "
                    f"{hex(got[~ok][0])} vs {hex(want[~ok][0])}")


def test_builtin_plugin_loads():
  p = hw.load_plugin()
  assert p.name == "cpu_model"
  assert p.ops == {"gemm", "quantize", "pack", "unpack", "top_k"}
  assert p.mantissa_bits == set(range(2, 25)) and p.block_sizes is None
  assert hw.cpu_kernel(p) in KERNELS


# (lhs, rhs, M, K, N): short last blocks, odd blocks, tails of the 4x64 tile, K < block,
# mixed mantissa widths and the int32 (m > 16) path.
GEMMS = [
    ("bfp8_b64", "bfp8_b64", 1, 1, 1),
    ("bfp8_b64", "bfp8_b64", 5, 70, 3),
    ("bfp8_b64", "bfp8_b64", 67, 200, 130),
    ("bfp4_b16", "bfp6_b16", 9, 33, 65),
    ("bfp2_b7", "bfp3_b7", 4, 50, 64),
    ("bfp12_b8", "bfp12_b8", 6, 41, 17),
    ("bfp16_b1", "bfp16_b1", 3, 5, 7),
    ("mxint8", "mxint8", 8, 96, 40),
    ("bfp20_b16", "bfp3_b16", 5, 48, 9),
    ("bfp24_b1", "bfp8_b1", 2, 3, 4),
]


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("lhs,rhs,m,k,n", GEMMS)
def test_gemm_matches_jax_exact(monkeypatch, kernel, lhs, rhs, m, k, n):
  monkeypatch.setenv("COLTRAIN_HW_KERNEL", kernel)
  rng = np.random.default_rng(m * 1000 + k * 10 + n)
  a = rand_values(rng, (m, k), specials=0.02)
  b = rand_values(rng, (k, n), specials=0.02)
  want = matmul(jnp.asarray(a), jnp.asarray(b), lhs=lhs, rhs=rhs, datapath="exact")
  got = matmul(jnp.asarray(a), jnp.asarray(b), lhs=lhs, rhs=rhs, datapath="exact",
               backend="hw")
  assert_same_bits(got, want)


@pytest.mark.parametrize("threads", ["1", "2", "7"])
def test_gemm_thread_counts(monkeypatch, threads):
  monkeypatch.setenv("COLTRAIN_HW_THREADS", threads)
  rng = np.random.default_rng(3)
  a, b = rand_values(rng, (130, 256)), rand_values(rng, (256, 200))
  want = matmul(jnp.asarray(a), jnp.asarray(b), lhs="bfp8", rhs="bfp8", datapath="exact")
  assert_same_bits(hw.gemm(jnp.asarray(a), jnp.asarray(b), "bfp8", "bfp8"), want)


def test_gemm_extreme_exponents_overflow_and_ftz():
  # Block products far above 2^128 (-> inf) and far below 2^-126 (-> FTZ), and sums that
  # cancel to zero or land below 2^-126.
  a = np.float32([[2.0**120, 1.0, 2.0**120, 3.0], [2.0**-120, 2.0**-125, 2.0**-120, 2.0**-121],
                  [1.5, -1.5, 1.5, -1.5]])
  b = np.float32([[2.0**100, 2.0**-100, 1.0], [1.0, 2.0**-100, 1.0],
                  [2.0**100, 2.0**-10, 1.0], [1.0, 2.0**-10, 1.0]])
  for fmts in (("bfp8_b2", "bfp8_b2"), ("bfp4_b4", "bfp6_b4"), ("bfp8_b1", "bfp8_b1")):
    want = matmul(jnp.asarray(a), jnp.asarray(b), lhs=fmts[0], rhs=fmts[1])
    got = matmul(jnp.asarray(a), jnp.asarray(b), lhs=fmts[0], rhs=fmts[1], backend="hw")
    assert_same_bits(got, want)
    got = np.asarray(got)
    assert got[0, 0] == np.inf and got[1, 1] == 0 and got[2, 2] == 0


@pytest.mark.parametrize("rounding", ["stochastic", "toward_zero"])
def test_gemm_other_roundings(rounding):
  rng = np.random.default_rng(5)
  a, b = rand_values(rng, (7, 90)), rand_values(rng, (90, 66))
  kw = {}
  if rounding == "stochastic":
    kw["random_bits"] = (jnp.asarray(rand_bits(rng, a.shape)),
                         jnp.asarray(rand_bits(rng, b.shape)))
  want = matmul(jnp.asarray(a), jnp.asarray(b), lhs="bfp5_b32", rhs="bfp7_b32",
                rounding=rounding, **kw)
  got = matmul(jnp.asarray(a), jnp.asarray(b), lhs="bfp5_b32", rhs="bfp7_b32",
               rounding=rounding, backend="hw", **kw)
  assert_same_bits(got, want)


def test_gemm_batched_leading_dims():
  rng = np.random.default_rng(7)
  a, b = rand_values(rng, (2, 3, 5, 40)), rand_values(rng, (40, 6))
  want = matmul(jnp.asarray(a), jnp.asarray(b), lhs="bfp8_b16", rhs="bfp8_b16")
  got = matmul(jnp.asarray(a), jnp.asarray(b), lhs="bfp8_b16", rhs="bfp8_b16", backend="hw")
  assert got.shape == (2, 3, 5, 6)
  assert_same_bits(got, want)


@pytest.mark.parametrize("case", [c for c in VECTORS if c["op"] == "matmul"
                                  and c["datapath"] == "exact"],
                         ids=lambda c: f"{c['lhs']}-{c['rhs']}")
def test_contract_vectors_on_hw(case):
  a = np.array([int(h, 16) for h in case["a"]], np.uint32).reshape(case["a_shape"])
  b = np.array([int(h, 16) for h in case["b"]], np.uint32).reshape(case["b_shape"])
  want = np.array([int(h, 16) for h in case["want"]], np.uint32)
  got = matmul(jnp.asarray(a.view(np.float32)), jnp.asarray(b.view(np.float32)),
               lhs=case["lhs"], rhs=case["rhs"], datapath="exact", backend="hw")
  assert ref.contract_equal(np.asarray(got).view(np.uint32).reshape(-1), want).all()


@pytest.mark.parametrize("case", [c for c in VECTORS if c["op"] == "quantize"
                                  and parse_format(c["format"]).kind == "bfp"],
                         ids=lambda c: f"{c['format']}-{c['rounding']}-axis{c['axis']}")
def test_contract_quantize_vectors_on_hw(case):
  x = np.array([int(h, 16) for h in case["x"]], np.uint32).reshape(case["shape"])
  x = np.moveaxis(x.view(np.float32), case["axis"], -1)
  bits = None
  if "random_bits" in case:
    bits = jnp.asarray(np.moveaxis(np.array(case["random_bits"], np.uint32)
                                   .reshape(case["shape"]), case["axis"], -1))
  got = hw.quantize(jnp.asarray(x), case["format"], rounding=case["rounding"],
                    random_bits=bits)
  want = np.array([int(h, 16) for h in case["want"]], np.uint32).reshape(case["shape"])
  got = np.moveaxis(np.asarray(got), -1, case["axis"]).view(np.uint32)
  assert ref.contract_equal(got, want).all()


@pytest.mark.parametrize("fmt", ["bfp2_b3", "bfp4_b16", "bfp8_b64", "mxint8", "bfp11_b5",
                                 "bfp16_b64", "bfp24_b2"])
@pytest.mark.parametrize("rounding", ["nearest_even", "stochastic", "toward_zero"])
def test_quantize_matches_jax(fmt, rounding):
  rng = np.random.default_rng(len(fmt) * 7 + len(rounding))
  x = rand_values(rng, (6, 77), spread=40, specials=0.03)
  bits = jnp.asarray(rand_bits(rng, x.shape)) if rounding == "stochastic" else None
  want = quantize(jnp.asarray(x), fmt, axis=-1, rounding=rounding, random_bits=bits)
  got = hw.quantize(jnp.asarray(x), fmt, rounding=rounding, random_bits=bits)
  assert_same_bits(got, want)


@pytest.mark.parametrize("fmt", ["bfp4_b16", "bfp8_b64", "bfp12_b32", "bfp20_b8"])
@pytest.mark.parametrize("rounding", ["nearest_even", "stochastic"])
def test_pack_unpack_identical_bytes(fmt, rounding):
  rng = np.random.default_rng(11)
  x = jnp.asarray(rand_values(rng, (3, 100), spread=20, specials=0.02))
  key = jax.random.key(4) if rounding == "stochastic" else None
  want = bfp_pack(x, fmt, rounding=rounding, key=key)
  got = bfp_pack(x, fmt, rounding=rounding, key=key, backend="hw")
  for name in ("mantissas", "exponents"):
    assert got[name].dtype == want[name].dtype and got[name].shape == want[name].shape
    assert np.asarray(got[name]).tobytes() == np.asarray(want[name]).tobytes(), name
  assert_same_bits(bfp_unpack(got, fmt, x.shape, backend="hw"), bfp_unpack(want, fmt, x.shape))
  assert_same_bits(bfp_unpack(got, fmt, x.shape, backend="hw"),
                   quantize(x, fmt, rounding=rounding,
                            key=key if rounding == "stochastic" else None))


def test_top_k_matches_jax_with_ties_and_specials():
  rng = np.random.default_rng(2)
  x = rng.choice(np.float32([0.5, -0.5, 1.0, -0.0, 0.0, 2.0, 1e-40, -1e-40]), 500)
  x[[7, 300]] = [np.inf, -np.inf]
  x[123] = np.nan
  for k in (1, 3, 10, 100, 499, 500):
    idx, vals = hw.top_k(jnp.asarray(x), k)
    want = top_k_indices(jnp.asarray(x), k)
    np.testing.assert_array_equal(np.asarray(idx), np.asarray(want))
    assert np.asarray(vals).tobytes() == x[np.asarray(want)].tobytes()
  assert 123 in np.asarray(hw.top_k(jnp.asarray(x), 1)[0])  # NaN counts as largest


def test_top_k_random_rows():
  rng = np.random.default_rng(9)
  x = rand_values(rng, (4, 3000), spread=30)
  idx, _ = hw.top_k(jnp.asarray(x), 30)
  for r in range(4):
    np.testing.assert_array_equal(np.asarray(idx[r]), np.asarray(top_k_indices(x[r], 30)))
