"""Algorithms end to end on heterogeneous least squares (coltrain.comm.testing), 8
workers: convergence of every algorithm, CHOCO(identity, gamma=1) == D-PSGD, byte
accounting, consensus distance, and the same results on 1 device (8 stacked workers)
and on 4 and 8 devices (2 and 1 stacked) in subprocesses.

Cross-device equality (D = 4, 8 against D = 1, 30 steps):
  - bitwise: dpsgd, gradient_tracking, choco with compressors none / top_k / rand_k /
    bfp (only ppermute + elementwise arithmetic), and allreduce / local_sgd with
    `exact_mean` (all_gather + fixed-order sum);
  - within atol 2e-5 (params of size ~1): psum-based allreduce, local_sgd, powersgd,
    and choco with qsgd: psum's reduction order depends on D, and compressors with
    reductions (the qsgd norm) may be compiled differently for a different block size
    L, which stochastic rounding can then amplify to one quantization level.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from coltrain.comm import algorithms as algs
from coltrain.comm import testing as ct
from coltrain.comm import topology as tp
from coltrain.comm import workers as wk

W = 8
STEPS = 100

CONVERGENCE = {
    "allreduce": dict(algorithm="allreduce"),
    "allreduce_top_k_ef": dict(algorithm="allreduce", compressor="top_k", ratio=0.1),
    "allreduce_qsgd": dict(algorithm="allreduce", compressor="qsgd", levels=4,
                           error_feedback=False),
    "allreduce_sign_ef": dict(algorithm="allreduce", compressor="sign"),
    "allreduce_rand_k": dict(algorithm="allreduce", compressor="rand_k", ratio=0.25,
                             error_feedback=False),
    "allreduce_bfp4": dict(algorithm="allreduce", compressor="bfp4_b16"),
    "dpsgd_ring": dict(algorithm="dpsgd", topology="ring"),
    "dpsgd_one_peer": dict(algorithm="dpsgd", topology="one_peer_exponential"),
    "choco_top_k": dict(algorithm="choco", compressor="top_k", ratio=0.25, gamma=0.5),
    "choco_qsgd_torus": dict(algorithm="choco", compressor="qsgd", levels=16, gamma=0.5,
                             topology="torus"),
    "choco_bfp8": dict(algorithm="choco", compressor="bfp8_b16", gamma=1.0),
    "gradient_tracking": dict(algorithm="gradient_tracking", topology="exponential"),
    "local_sgd": dict(algorithm="local_sgd", local_steps=4),
    "powersgd": dict(algorithm="powersgd", rank=1),
}

_CACHE = {}


def run(name, **kw):
  key = (name, tuple(sorted(kw.items())))
  if key not in _CACHE:
    cfg = dict(CONVERGENCE[name], workers=W)
    _CACHE[key] = ct.simulate(cfg, steps=kw.pop("steps", STEPS), learning_rate=0.1, **kw)
  return _CACHE[key]


@pytest.mark.parametrize("name", list(CONVERGENCE))
def test_converges(name):
  """Loss of the average model ends within 1% of the initial excess loss above the
  least-squares optimum, and the workers agree (consensus distance small and far
  below its peak)."""
  r = run(name)
  xs, ys, _ = ct.linreg_problem(W)
  zero = {"kernel": np.zeros((16, 4)), "bias": np.zeros(4)}
  initial_excess = ct.global_loss(zero, xs, ys) - r["optimum_loss"]
  final_excess = r["loss"][-1] - r["optimum_loss"]
  assert final_excess >= -1e-4
  assert final_excess < 0.01 * initial_excess, (name, final_excess, initial_excess)
  cons = r["consensus"]
  assert cons[-1] < 0.05, (name, cons[-1])
  assert cons[-1] <= 0.1 * cons.max() or cons.max() < 1e-8, (name, cons[-1], cons.max())
  assert np.all(np.isfinite(r["params"]["kernel"]))


def test_gradient_tracking_is_exact_with_constant_lr():
  """With full gradients and a constant step, gradient tracking converges to the exact
  optimum and consensus; D-PSGD stalls at a heterogeneity-induced distance."""
  gt = ct.simulate(dict(algorithm="gradient_tracking", workers=W, topology="ring"),
                   steps=300, learning_rate=0.1, schedule="constant")
  dp = ct.simulate(dict(algorithm="dpsgd", workers=W, topology="ring"), steps=300,
                   learning_rate=0.1, schedule="constant")
  assert gt["loss"][-1] - gt["optimum_loss"] < 1e-4
  assert gt["consensus"][-1] < 1e-8
  assert dp["consensus"][-1] > 1e-2


def test_choco_identity_gamma_one_equals_dpsgd():
  """Not bitwise: CHOCO rounds x_hat + (x' - x_hat) and x' + (sum_j W_ij x_hat_j - x_hat_i)
  where D-PSGD computes sum_j W_ij x'_j, so each step differs by a few ulp; the mixing
  contracts, so the gap stays at float32 rounding level (checked: atol 1e-5 over 100
  steps, params of size ~1)."""
  for top in ("ring", "one_peer_exponential", "torus"):
    a = ct.simulate(dict(algorithm="choco", compressor="none", gamma=1.0, topology=top,
                         workers=W), steps=STEPS, learning_rate=0.1)
    b = ct.simulate(dict(algorithm="dpsgd", topology=top, workers=W), steps=STEPS,
                    learning_rate=0.1)
    for k in ("kernel", "bias"):
      np.testing.assert_allclose(a["params"][k], b["params"][k], rtol=0, atol=1e-5)
    np.testing.assert_allclose(a["consensus"], b["consensus"], rtol=1e-3, atol=1e-9)
    np.testing.assert_array_equal(a["bytes"], b["bytes"])  # none payload = the model


def test_bytes_per_worker():
  model = 4 * (16 * 4 + 4)  # float32 kernel + bias
  ring = 2 * (W - 1) / W * model

  def first(name, **kw):
    return run(name, **kw)["bytes"]

  np.testing.assert_allclose(first("allreduce"), ring)
  k_kernel, k_bias = 7, 1  # top_k 0.1 of 64 and of 4
  np.testing.assert_allclose(first("allreduce_top_k_ef"), (W - 1) * 6 * (k_kernel + k_bias))  # f32 + u16
  np.testing.assert_allclose(first("allreduce_rand_k"), (W - 1) * 4 * (16 + 1))
  np.testing.assert_allclose(first("allreduce_sign_ef"), (W - 1) * ((4 + 8) + (4 + 1)))
  np.testing.assert_allclose(first("allreduce_qsgd"),  # 1 + 3 bits per element
                             (W - 1) * ((4 + 32) + (4 + 2)))
  np.testing.assert_allclose(first("allreduce_bfp4"),  # int8 mantissas + 1 byte/block
                             (W - 1) * ((64 + 16) + (4 + 1)))
  np.testing.assert_allclose(first("dpsgd_ring"), 2 * model)
  np.testing.assert_allclose(first("dpsgd_one_peer"), model)
  np.testing.assert_allclose(first("choco_top_k"), 2 * 6 * (16 + 1))
  np.testing.assert_allclose(first("choco_qsgd_torus"), 3 * ((4 + 48) + (4 + 3)))  # 2x4 torus
  np.testing.assert_allclose(first("gradient_tracking"), 3 * 2 * model)  # 3 peers, x and y
  lsgd = first("local_sgd")
  np.testing.assert_allclose(lsgd[3::4], ring)
  assert np.all(lsgd[np.arange(STEPS) % 4 != 3] == 0)
  np.testing.assert_allclose(first("powersgd"), 2 * (W - 1) / W * 4 * ((16 + 4) * 1 + 4))
  # the host-side exact bytes agree with the in-graph stats
  like = {"kernel": jax.ShapeDtypeStruct((16, 4), jnp.float32),
          "bias": jax.ShapeDtypeStruct((4,), jnp.float32)}
  tx = optax.sgd(0.1)
  a = algs.make_algorithm(dict(CONVERGENCE["local_sgd"], workers=W), tx=tx)
  assert a.bytes_per_step(3, like)[0] == pytest.approx(ring)
  assert a.bytes_per_step(4, like)[0] == 0


def _stacked_step(alg, params, grads, step=0):
  mesh = wk.make_mesh(1)
  tx = optax.sgd(0.1)
  opt = algs.init_opt_state(tx, params)

  def f(p, g, o, c, s, k):
    return alg.step(p, g, o, c, s, k)

  fn = jax.jit(wk.run_per_worker(f, mesh, replicated_args=(4, 5)))
  return fn(params, grads, opt, alg.init(params), jnp.int32(step), jax.random.PRNGKey(0))


def test_allreduce_keeps_workers_identical_and_powersgd_full_rank_matches():
  rng = np.random.default_rng(0)
  params = wk.stack({"k": jnp.asarray(rng.normal(size=(6, 3)).astype(np.float32)),
                     "b": jnp.zeros((3,), jnp.float32)}, W)
  grads = {"k": jnp.asarray(rng.normal(size=(W, 6, 3)).astype(np.float32)),
           "b": jnp.asarray(rng.normal(size=(W, 3)).astype(np.float32))}
  tx = optax.sgd(0.1)
  ar = algs.allreduce(tx, W)
  p_ar, _, _, st = _stacked_step(ar, params, grads)
  for v in jax.tree.leaves(p_ar):
    assert all(np.array_equal(v[0], v[i]) for i in range(W))
  assert float(st["consensus_distance"][0]) < 1e-10
  # rank >= min(rows, cols): PowerSGD reproduces the mean gradient (float rounding)
  ps = algs.powersgd(tx, W, rank=3)
  p_ps, _, cs, _ = _stacked_step(ps, params, grads)
  for a, b in zip(jax.tree.leaves(p_ps), jax.tree.leaves(p_ar)):
    np.testing.assert_allclose(a, b, atol=1e-5)
  # local errors e_i = M_i - P_hat Q_i^T are not zero (P_hat spans the mean's columns),
  # but they average to zero: mean_i M_i is reproduced exactly
  err = np.asarray(cs["error"]["k"], np.float64)
  assert np.abs(err).max() > 1e-2
  np.testing.assert_allclose(err.mean(0), 0, atol=1e-5)
  np.testing.assert_array_equal(cs["error"]["b"], 0)  # vectors: sent uncompressed


def test_consensus_distance_and_average():
  rng = np.random.default_rng(1)
  x = {"a": rng.normal(size=(W, 5, 2)).astype(np.float32),
       "b": rng.normal(size=(W, 3)).astype(np.float32)}
  mesh = wk.make_mesh(1)
  f = jax.jit(wk.run_per_worker(
      lambda t: (algs.consensus_distance(t), algs.average_params(t)), mesh))
  cd, avg = f(wk.shard(jax.tree.map(jnp.asarray, x), mesh))
  ref = sum(((v.astype(np.float64) - v.astype(np.float64).mean(0)) ** 2).reshape(W, -1)
            .sum(1) for v in x.values()).mean()
  np.testing.assert_allclose(np.asarray(cd), ref, rtol=1e-5)
  np.testing.assert_allclose(avg["a"], np.broadcast_to(x["a"].mean(0), x["a"].shape),
                             atol=1e-6)


def test_local_sgd_syncs_exactly():
  rng = np.random.default_rng(2)
  params = wk.stack({"k": jnp.zeros((4,), jnp.float32)}, W)
  grads = {"k": jnp.asarray(rng.normal(size=(W, 4)).astype(np.float32))}
  a = algs.local_sgd(optax.sgd(0.1), W, local_steps=3)
  p1, _, _, _ = _stacked_step(a, params, grads, step=0)  # no sync
  assert not np.array_equal(p1["k"][0], p1["k"][1])
  p2, _, _, _ = _stacked_step(a, params, grads, step=2)  # (2 + 1) % 3 == 0: sync
  assert all(np.array_equal(p2["k"][0], p2["k"][i]) for i in range(W))


def test_choco_keeps_public_copies_consistent():
  """x_hat_i after a step is x_hat_i + decoded q_i; neighbours read exactly it."""
  rng = np.random.default_rng(3)
  params = wk.stack({"k": jnp.zeros((10,), jnp.float32)}, W)
  grads = {"k": jnp.asarray(rng.normal(size=(W, 10)).astype(np.float32))}
  from coltrain.comm import compressors as C
  a = algs.choco(optax.sgd(0.1), tp.ring(W), C.top_k(0.2), gamma=0.5)
  p, _, cs, _ = _stacked_step(a, params, grads)
  half = -0.1 * np.asarray(grads["k"])
  xh = np.asarray(cs["x_hat"]["k"])
  assert all(np.count_nonzero(xh[i]) == 2 for i in range(W))  # x_hat = 0 + top_2(half)
  m = tp.ring(W).matrix()
  np.testing.assert_allclose(np.asarray(p["k"]), half + 0.5 * (m @ xh - xh), atol=1e-6)


CROSS = [
    dict(algorithm="dpsgd", topology="ring"),
    dict(algorithm="dpsgd", topology="one_peer_exponential"),
    dict(algorithm="gradient_tracking", topology="torus"),
    dict(algorithm="choco", compressor="none", gamma=1.0, topology="exponential"),
    dict(algorithm="choco", compressor="top_k", ratio=0.25, gamma=0.5),
    dict(algorithm="choco", compressor="rand_k", ratio=0.5, gamma=0.3),
    dict(algorithm="choco", compressor="bfp6_b8", gamma=0.8),
    dict(algorithm="allreduce", exact_mean=True),
    dict(algorithm="allreduce", compressor="top_k", ratio=0.2, exact_mean=True),
    dict(algorithm="local_sgd", local_steps=3, exact_mean=True),
    # psum-based and reduction-heavy: float tolerance
    dict(algorithm="allreduce"),
    dict(algorithm="local_sgd", local_steps=3),
    dict(algorithm="powersgd", rank=2),
    dict(algorithm="choco", compressor="qsgd", levels=8, gamma=0.5),
]
BITWISE = 10  # the first BITWISE configs must agree bit for bit


@pytest.fixture(scope="module")
def cross_runs(tmp_path_factory):
  d = tmp_path_factory.mktemp("cross")
  cfgs = [dict(c, workers=W) for c in CROSS]
  out = {}
  for devices in (1, 4, 8):
    path = str(d / f"d{devices}.npz")
    code = ("import json\nfrom coltrain.comm.testing import simulate_many\n"
            f"simulate_many(json.loads({json.dumps(json.dumps(cfgs))}), {path!r}, "
            "steps=30, learning_rate=0.1)\n")
    ct.run_in_subprocess(code, devices, timeout=300)
    out[devices] = dict(np.load(path))
  return out


@pytest.mark.parametrize("devices", [4, 8])
def test_same_results_on_more_devices(cross_runs, devices):
  ref, got = cross_runs[1], cross_runs[devices]
  assert set(ref) == set(got)
  for i, cfg in enumerate(CROSS):
    for what in ("kernel", "bias", "bytes"):
      a, b = ref[f"{i}/{what}"], got[f"{i}/{what}"]
      if i < BITWISE or what == "bytes":
        np.testing.assert_array_equal(a, b, err_msg=f"{cfg} {what} D={devices}")
      else:
        np.testing.assert_allclose(a, b, rtol=0, atol=2e-5, err_msg=f"{cfg} {what}")
    if cfg["algorithm"] in ("allreduce", "powersgd", "local_sgd"):  # synchronous: all
      k = got[f"{i}/kernel"]  # workers hold bitwise the same model (psum is replicated)
      assert all(np.array_equal(k[0], k[j]) for j in range(W)), cfg
    # consensus uses psum (order depends on D): float tolerance
    np.testing.assert_allclose(ref[f"{i}/consensus"], got[f"{i}/consensus"], rtol=1e-4,
                               atol=1e-9, err_msg=f"{cfg} consensus")


def test_make_algorithm_validates():
  tx = optax.sgd(0.1)
  with pytest.raises(ValueError, match="sends uncompressed models"):
    algs.make_algorithm(dict(algorithm="dpsgd", compressor="top_k", workers=4), tx=tx)
  with pytest.raises(ValueError, match="needs the optimizer"):
    algs.make_algorithm(dict(algorithm="dpsgd", workers=4))
  a = algs.make_algorithm(dict(algorithm="choco", compressor="qsgd", workers=4), tx=tx)
  assert a.name == "choco" and a.compressor.name == "qsgd(16)" and a.topology.name == "ring"
  a = algs.make_algorithm(dict(algorithm="allreduce", compressor="sign", workers=4), tx=tx)
  assert a.compressor.name == "ef(sign)"
  with pytest.raises(ValueError, match="topology has 8 workers"):
    algs.make_algorithm(dict(algorithm="dpsgd", workers=4), tp.ring(8), None, tx)
