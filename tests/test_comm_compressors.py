"""Compressor contracts: payload = what is sent (decode(payload) == decoded bit for bit),
exact byte counts at real dtypes, top_k sparsity, unbiasedness of rand_k and qsgd
(statistical, 5-sigma per element), sign, powersgd rank-r exactness, the bfp wire format
(bit-exact against coltrain.numerics.quantize; int8/int16 mantissas, int8 exponents),
and the error-feedback invariant."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from coltrain.comm import compressors as C
from coltrain.numerics import quantize

KEY = jax.random.PRNGKey(7)


def _tree(seed=0):
  rng = np.random.default_rng(seed)
  return {"kernel": jnp.asarray(rng.normal(size=(37, 5)).astype(np.float32)),
          "conv": jnp.asarray(rng.normal(size=(3, 3, 2, 4)).astype(np.float32)),
          "bias": jnp.asarray(rng.normal(size=(11,)).astype(np.float32)),
          "scalar": jnp.float32(-2.5)}


ALL = ["none", "top_k", "rand_k", "qsgd", "sign", "powersgd", "bfp8_b64", "bfp12_b16",
       "bfp20_b8"]


def _make(name, ef=False):
  return C.make_compressor(name, ratio=0.1, levels=4, rank=2, error_feedback=ef)


def _bits(x):
  return np.asarray(x, np.float32).view(np.uint32)


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("ef", [False, True])
def test_decode_of_payload_is_decoded_and_bytes_are_static(name, ef):
  c = _make(name, ef)
  x = _tree()
  state = c.init(x)
  payload, decoded, new_state = jax.jit(c.compress)(x, state, KEY)
  again = jax.jit(c.decode)(payload, x, KEY)
  for a, b in zip(jax.tree.leaves(decoded), jax.tree.leaves(again)):
    np.testing.assert_array_equal(_bits(a), _bits(b))
  assert jax.tree.structure(decoded) == jax.tree.structure(x)
  for d, v in zip(jax.tree.leaves(decoded), jax.tree.leaves(x)):
    assert d.shape == v.shape and d.dtype == v.dtype
  assert jax.tree.structure(new_state) == jax.tree.structure(state)
  # payload bytes: static, from shapes and dtypes (also through eval_shape)
  n = c.payload_bytes(payload)
  shapes = jax.eval_shape(lambda x, s, k: c.compress(x, s, k)[0], x, state, KEY)
  assert c.payload_bytes(shapes) == n
  assert n == sum(p.size * p.dtype.itemsize for p in jax.tree.leaves(payload))


def _sizes(x):
  return [int(np.prod(np.shape(v))) for v in jax.tree.leaves(x)]


def test_bytes_formulas():
  x = _tree()
  sizes = _sizes(x)  # leaves order: bias, conv, kernel, scalar (sorted dict keys)
  assert sizes == [11, 72, 185, 1]

  def nbytes(c):  # from shapes only: eval_shape traces, nothing runs
    return c.payload_bytes(jax.eval_shape(lambda x, s, k: c.compress(x, s, k)[0],
                                          x, c.init(x), KEY))

  assert nbytes(C.none()) == 4 * sum(sizes)
  ks = [C.ratio_to_k(0.1, n) for n in sizes]
  assert ks == [2, 8, 19, 1]
  # top_k: float32 value + uint16 index offset per kept entry (leaves <= 65536 entries
  # need no segment counts)
  assert nbytes(C.top_k(0.1)) == 6 * sum(ks)
  big = {"w": jnp.zeros((3 * 65536 + 5,), jnp.float32)}  # 4 segments, k = 1967 < 65536
  k_big = C.ratio_to_k(0.01, 3 * 65536 + 5)
  assert C.top_k(0.01).payload_bytes(jax.eval_shape(
      lambda x: C.top_k(0.01).compress(x, C.top_k(0.01).init(x), KEY)[0], big)
  ) == 6 * k_big + 2 * 4
  assert nbytes(C.rand_k(0.1)) == 4 * sum(ks)
  assert nbytes(C.rand_k(0.1, send_indices=True)) == 8 * sum(ks)
  for s in (1, 3, 4, 16, 255):
    width = 1 + math.ceil(math.log2(s + 1))
    assert nbytes(C.qsgd(s)) == sum(4 + math.ceil(n * width / 8) for n in sizes)
  assert nbytes(C.sign()) == sum(4 + math.ceil(n / 8) for n in sizes)
  # powersgd rank 2: kernel (37, 5) -> 2 (37 + 5); conv (18, 4) -> 2 (18 + 4); vectors raw
  assert nbytes(C.powersgd(2)) == 4 * (2 * (37 + 5) + 2 * (18 + 4) + 11 + 1)
  assert nbytes(C.powersgd(10)) == 4 * (5 * (37 + 5) + 4 * (18 + 4) + 11 + 1)
  # bfp: one mantissa per element at its storage width + one byte per block (last axis)
  rows = {"bias": (1, 11), "conv": (18, 4), "kernel": (37, 5), "scalar": (1, 1)}

  def bfp_bytes(m, b):
    item = 1 if m <= 8 else 2 if m <= 16 else 4
    return sum(r * (c * item + math.ceil(c / b)) for r, c in rows.values())

  assert nbytes(C.bfp("bfp8_b64")) == bfp_bytes(8, 64)
  assert nbytes(C.bfp("bfp4_b2")) == bfp_bytes(4, 2)
  assert nbytes(C.bfp("bfp12_b16")) == bfp_bytes(12, 16)
  assert nbytes(C.bfp("bfp20_b8")) == bfp_bytes(20, 8)
  # ratio_to_k: float noise must not add one
  assert C.ratio_to_k(0.07, 100) == 7 and C.ratio_to_k(0.001, 10) == 1
  assert C.ratio_to_k(1.0, 10) == 10 and C.ratio_to_k(0.15, 10) == 2


@pytest.mark.parametrize("ratio", [0.001, 0.01, 0.1, 0.5, 1.0])
def test_top_k_exactly_k_largest(ratio):
  rng = np.random.default_rng(1)
  for shape in [(1,), (7,), (100,), (33, 17)]:
    v = rng.normal(size=shape).astype(np.float32)
    x = {"v": jnp.asarray(v)}
    c = C.top_k(ratio)
    payload, dec, _ = c.compress(x, c.init(x), KEY)
    n = v.size
    k = max(1, math.ceil(ratio * n))
    d = np.asarray(dec["v"])
    assert np.count_nonzero(d) == k
    assert payload[0]["index_low"].dtype == jnp.uint16
    assert payload[0]["values"].dtype == jnp.float32
    kept = np.abs(v.reshape(-1))[np.flatnonzero(d.reshape(-1))]
    dropped = np.abs(v.reshape(-1))[d.reshape(-1) == 0]
    assert dropped.size == 0 or kept.min() >= dropped.max()
    np.testing.assert_array_equal(d[d != 0], v[d != 0])  # kept values are exact


def _mean_of_decodes(c, v, n_samples):
  x = {"v": jnp.asarray(v)}
  state = c.init(x)
  keys = jax.random.split(jax.random.PRNGKey(123), n_samples)
  dec = jax.jit(jax.vmap(lambda k: c.compress(x, state, k)[1]["v"]))(keys)
  return np.asarray(dec, np.float64)


def test_rand_k_unbiased():
  """E[decoded] = x. Each element is kept with probability p = k/n and scaled by 1/p, so
  the sample mean over N draws has std |x_i| sqrt((1 - p) / (p N)); we require every
  element within 5 of those stds (plus float32 slack)."""
  v = np.random.default_rng(2).normal(size=(40,)).astype(np.float32)
  n_samples = 20000
  c = C.rand_k(0.1)
  dec = _mean_of_decodes(c, v, n_samples)
  assert all(np.count_nonzero(d) == 4 for d in dec[:50])
  p = 4 / 40
  sigma = np.abs(v) * np.sqrt((1 - p) / (p * n_samples))
  assert np.all(np.abs(dec.mean(0) - v) <= 5 * sigma + 1e-6)


def test_qsgd_unbiased_and_levels():
  """E[decoded] = x. Per element the level is Bernoulli between two neighbours
  norm/s apart, so the sample-mean std is at most norm / (2 s sqrt(N)); every element
  must lie within 5 of those (plus float32 slack)."""
  v = np.random.default_rng(3).normal(size=(50,)).astype(np.float32)
  s, n_samples = 4, 20000
  c = C.qsgd(s)
  dec = _mean_of_decodes(c, v, n_samples)
  norm = float(np.linalg.norm(v.astype(np.float64)))
  grid = dec[:200] / norm * s  # decoded values lie on the grid norm * l / s, |l| <= s
  assert np.allclose(grid, np.round(grid), atol=1e-4) and np.abs(grid).max() <= s + 1e-4
  assert np.all(np.sign(dec[:200]) * np.sign(v) >= 0)
  sigma = norm / (2 * s * math.sqrt(n_samples))
  assert np.all(np.abs(dec.mean(0) - v) <= 5 * sigma + 1e-5)


def test_qsgd_zero_and_bit_packing_roundtrip():
  c = C.qsgd(3)
  x = {"z": jnp.zeros((9,), jnp.float32)}
  _, d, _ = c.compress(x, c.init(x), KEY)
  np.testing.assert_array_equal(d["z"], 0)
  codes = jnp.asarray(np.random.default_rng(0).integers(0, 8, size=13), jnp.uint32)
  packed = C.pack_bits(codes, 3)
  assert packed.dtype == jnp.uint8 and packed.shape == (math.ceil(13 * 3 / 8),)
  np.testing.assert_array_equal(C.unpack_bits(packed, 13, 3), codes)


def test_sign():
  v = np.array([1.5, -2.0, 0.0, 3.0, -0.5, 0.25, -1.0, 2.0, 7.0], np.float32)
  c = C.sign()
  payload, d, _ = c.compress({"v": jnp.asarray(v)}, c.init({"v": v}), KEY)
  scale = np.float32(np.abs(v).sum() / v.size)
  np.testing.assert_allclose(d["v"], np.where(v < 0, -scale, scale), rtol=1e-7)
  assert payload[0]["signs"].dtype == jnp.uint8 and payload[0]["signs"].shape == (2,)
  assert payload[0]["scale"].dtype == jnp.float32


@pytest.mark.parametrize("rank", [1, 2, 3])
def test_powersgd_exact_on_rank_r(rank):
  rng = np.random.default_rng(rank)
  m = (rng.normal(size=(30, rank)) @ rng.normal(size=(rank, 12))).astype(np.float32)
  conv = (rng.normal(size=(18, rank)) @ rng.normal(size=(rank, 4))).astype(np.float32)
  x = {"m": jnp.asarray(m), "conv": jnp.asarray(conv.reshape(3, 3, 2, 4)),
       "b": jnp.asarray(rng.normal(size=(12,)).astype(np.float32))}
  c = C.powersgd(rank)
  state = c.init(x)
  payload, d, new_state = c.compress(x, state, KEY)
  # a rank-r matrix is reproduced by one rank-r power iteration (up to float32 rounding)
  np.testing.assert_allclose(d["m"], m, rtol=0, atol=1e-4 * np.abs(m).max())
  np.testing.assert_allclose(d["conv"], x["conv"], rtol=0, atol=1e-4 * np.abs(conv).max())
  np.testing.assert_array_equal(d["b"], x["b"])  # 1-D leaves are sent uncompressed
  # warm start: the new Q is the payload's Q
  leaves = jax.tree.leaves(x)  # b, conv, m
  assert new_state[0] is None
  np.testing.assert_array_equal(new_state[2], payload[2]["q"])
  assert payload[2]["p"].shape == (30, rank) and payload[2]["q"].shape == (12, rank)
  p = np.asarray(payload[2]["p"], np.float64)
  np.testing.assert_allclose(p.T @ p, np.eye(rank), atol=1e-5)  # orthonormal P_hat
  del leaves


def _special_values(rng, shape):
  x = rng.normal(size=shape).astype(np.float32) * (2.0 ** rng.integers(-30, 30, size=shape))
  flat = x.reshape(-1)
  special = [0.0, -0.0, 1e-40, -3e-39, 3.4e38]  # zero, subnormals (DAZ), near max
  flat[:min(5, flat.size)] = special[:flat.size]
  return flat.reshape(shape).astype(np.float32)


@pytest.mark.parametrize("fmt", ["bfp8_b64", "bfp4_b8", "bfp2_b3", "bfp12_b16",
                                 "bfp16_b32", "bfp24_b4", "mxint8"])
def test_bfp_wire_roundtrip_bit_exact(fmt):
  rng = np.random.default_rng(5)
  for shape in [(1,), (5, 13), (3, 2, 64), (2, 129)]:
    x = _special_values(rng, shape)
    payload, got = jax.jit(lambda v: (lambda p: (p, C.bfp_unpack(p, fmt, v.shape)))(
        C.bfp_pack(v, fmt)))(jnp.asarray(x))
    m = int(fmt[3:].split("_")[0]) if fmt.startswith("bfp") else 8
    expected = jnp.int8 if m <= 8 else jnp.int16 if m <= 16 else jnp.int32
    assert payload["mantissas"].dtype == expected
    assert payload["mantissas"].shape == x.shape
    assert payload["exponents"].dtype == jnp.int8
    ref = quantize(jnp.asarray(x), fmt)
    np.testing.assert_array_equal(_bits(got), _bits(ref), err_msg=f"{fmt} {shape}")


def test_bfp_nonfinite_blocks_and_compressor():
  x = np.arange(12, dtype=np.float32).reshape(2, 6)
  x[0, 1] = np.nan
  x[1, 5] = np.inf
  payload = C.bfp_pack(jnp.asarray(x), "bfp8_b4")
  assert payload["exponents"].tolist() == [[C.NONFINITE_EXPONENT, 2], [3, C.NONFINITE_EXPONENT]]
  got = C.bfp_unpack(payload, "bfp8_b4", x.shape)
  np.testing.assert_array_equal(_bits(got), _bits(quantize(jnp.asarray(x), "bfp8_b4")))
  # through the pytree compressor, and a 0-d leaf blocked as shape (1,)
  c = C.bfp("bfp8_b16")
  t = {"w": jnp.asarray(np.random.default_rng(0).normal(size=(4, 20)).astype(np.float32)),
       "s": jnp.float32(0.1234567)}
  p, d, _ = jax.jit(c.compress)(t, c.init(t), KEY)
  np.testing.assert_array_equal(_bits(d["w"]), _bits(quantize(t["w"], "bfp8_b16")))
  np.testing.assert_array_equal(_bits(d["s"]).reshape(1),
                                _bits(quantize(t["s"].reshape(1), "bfp8_b16")))
  with pytest.raises(ValueError, match="bfp format"):
    C.bfp("mxfp8_e4m3")


@pytest.mark.parametrize("name", ALL)
def test_error_feedback_invariant(name):
  """decoded + e' == v := fl(x + e) up to the single rounding of e' = fl(v - decoded):
  in exact (float64) arithmetic |decoded + e' - v| <= 2^-24 |v - decoded| elementwise,
  and bitwise (decoded + e' == v exactly) for none and top_k, where decoded is v or 0."""
  c = _make(name, ef=True)
  state = c.init(_tree())
  comp = jax.jit(c.compress)
  for step in range(4):
    x = _tree(seed=10 + step)
    e_old = state["error"]
    payload, d, state = comp(x, state, jax.random.fold_in(KEY, step))
    for xv, ev, dv, nv in zip(*(jax.tree.leaves(t) for t in (x, e_old, d, state["error"]))):
      v = np.asarray(xv, np.float32) + np.asarray(ev, np.float32)  # = fl(x + e)
      dv, nv = np.asarray(dv, np.float64), np.asarray(nv, np.float64)
      gap = np.abs(dv + nv - v)
      assert np.all(gap <= 2.0**-24 * np.abs(v - dv)), (name, step)
      if name in ("none", "top_k"):
        assert np.all(gap == 0)
  if name == "none":
    assert all(np.all(np.asarray(e) == 0) for e in jax.tree.leaves(state["error"]))


def test_vmap_over_workers_uses_independent_keys():
  c = C.rand_k(0.25)
  x = {"v": jnp.asarray(np.arange(1, 17, dtype=np.float32))}
  stacked = jax.tree.map(lambda v: jnp.stack([v] * 4), x)
  keys = jax.vmap(lambda i: jax.random.fold_in(KEY, i))(jnp.arange(4))
  state = jax.vmap(c.init)(stacked)
  _, d, _ = jax.vmap(c.compress)(stacked, state, keys)
  nz = [tuple(np.flatnonzero(np.asarray(d["v"][i]))) for i in range(4)]
  assert len(set(nz)) > 1 and all(len(z) == 4 for z in nz)


def test_make_compressor_names():
  assert C.make_compressor("none").name == "none"
  assert C.make_compressor("top_k", ratio=0.5, error_feedback=True).name == "ef(top_k(0.5))"
  assert C.make_compressor("bfp6").name == "bfp6_b64"
  assert C.make_compressor("mxint8").name == "mxint8"
  for bad in ("mxfp8_e4m3", "fp32", "topk", "bfp1"):
    with pytest.raises(ValueError):
      C.make_compressor(bad)
  with pytest.raises(ValueError):
    C.top_k(0.0)
  with pytest.raises(ValueError):
    C.qsgd(0)
  with pytest.raises(ValueError):
    C.powersgd(0)


def test_top_k_segment_encoding_round_trips_on_large_leaves():
  """Indices beyond 65535 travel as uint16 offsets plus per-segment counts, losslessly."""
  n = 5 * 65536 + 123
  x = {"w": jax.random.normal(jax.random.PRNGKey(3), (n,), jnp.float32)}
  c = C.top_k(0.002)
  payload, decoded, _ = c.compress(x, c.init(x), KEY)
  leaf = jax.tree.leaves(payload)
  k = C.ratio_to_k(0.002, n)
  flat = np.asarray(x["w"])
  keep = np.argsort(-np.abs(flat), kind="stable")[:k]
  want = np.zeros(n, np.float32)
  want[keep] = flat[keep]
  np.testing.assert_array_equal(np.asarray(decoded["w"]), want)
  dtypes = sorted(str(l.dtype) for l in leaf)
  assert dtypes == ["float32", "uint16", "uint16"]
