"""Topologies: structure, weights, spectral gaps, and gossip against the dense mixing
matrix (1 device, W stacked; multi-device bitwise equality is in test_comm_workers)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from coltrain.comm import topology as tp
from coltrain.comm import workers as wk

ALL = [(name, w) for name in tp.TOPOLOGIES for w in (1, 2, 4, 6, 8, 9, 16)
       if not (name == "torus" and w in (1, 2))]


def _build(name, w):
  return tp.make_topology(name, w)


@pytest.mark.parametrize("name,w", ALL)
def test_doubly_stochastic_and_terms(name, w):
  t = _build(name, w)
  for s in range(t.period):
    ph = t.mixing(s)
    m = ph.matrix()
    assert tp.is_doubly_stochastic(m), (name, w, s)
    for term in ph.terms:  # each term is a permutation that moves every worker
      assert sorted(term.src) == list(range(w))
      assert all(term.src[i] != i for i in range(w))
    assert (ph.out_degree() == len(ph.terms)).all()  # regular graphs


def test_ring_torus_complete_weights():
  m = tp.ring(8).matrix()
  assert np.allclose(np.diag(m), 1 / 3) and np.allclose(m[0, [1, 7]], 1 / 3)
  assert np.allclose(tp.ring(2).matrix(), 0.5)
  assert np.allclose(tp.ring(1).matrix(), 1.0)
  assert np.allclose(tp.complete(5).matrix(), 0.2)
  m = tp.torus(16).matrix()  # 4 x 4: degree 4, MH weight 1/5
  assert np.allclose(m[m > 0], 0.2) and ((m > 0).sum(1) == 5).all()
  m = tp.torus(8).matrix()  # 2 x 4: row neighbours +-1 coincide -> degree 3
  assert ((m > 0).sum(1) == 4).all() and np.allclose(m[m > 0], 0.25)
  assert tp._grid(12) == (3, 4) and tp._grid(16) == (4, 4) and tp._grid(6) == (2, 3)
  with pytest.raises(ValueError, match="only make a ring"):
    tp.torus(7)
  # MH on the ring's adjacency equals the ring's matrix
  adj = tp.ring(6).matrix() > 0
  np.testing.assert_allclose(tp.metropolis_hastings(adj), tp.ring(6).matrix())


def test_symmetric_matrices():
  for t in (tp.ring(8), tp.torus(12), tp.complete(6), tp.exponential(8, symmetric=True)):
    m = t.matrix()
    np.testing.assert_allclose(m, m.T)


def test_spectral_gaps_known_values():
  # ring with MH weights 1/3: eigenvalues (1 + 2 cos(2 pi k / W)) / 3
  for w in (3, 5, 8, 16):
    lam = [(1 + 2 * math.cos(2 * math.pi * k / w)) / 3 for k in range(w)]
    expected = 1 - sorted(map(abs, lam))[-2]
    assert tp.ring(w).spectral_gap() == pytest.approx(expected, abs=1e-12)
  for w in (2, 5, 8):
    assert tp.complete(w).spectral_gap() == pytest.approx(1.0, abs=1e-12)
  assert tp.ring(1).spectral_gap() == 1.0
  # static exponential graph, W = 2^tau: gap 2 / (1 + tau) (Ying et al. 2021)
  for tau in (2, 3, 4, 5):
    assert tp.exponential(2**tau).spectral_gap() == pytest.approx(2 / (1 + tau), abs=1e-12)
  # one-peer exponential, W = 2^tau: one period averages exactly -> gap 1
  for tau in (1, 2, 3, 4):
    t = tp.one_peer_exponential(2**tau)
    assert t.period == tau
    np.testing.assert_allclose(t.period_matrix(), np.full((2**tau,) * 2, 2.0**-tau),
                               atol=1e-15)
    assert t.spectral_gap() == pytest.approx(1.0, abs=1e-12)
  # torus 4 x 4 (MH 1/5): eigenvalues (1 + 2cos(2 pi a/4) + 2cos(2 pi b/4)) / 5
  lam = [(1 + 2 * math.cos(math.pi * a / 2) + 2 * math.cos(math.pi * b / 2)) / 5
         for a in range(4) for b in range(4)]
  assert tp.torus(16).spectral_gap() == pytest.approx(1 - sorted(map(abs, lam))[-2])
  # larger, better connected graphs mix faster
  assert tp.ring(16).spectral_gap() < tp.torus(16).spectral_gap() < 1.0


def _gossip_fn(t, steps):
  mesh = wk.make_mesh(1)

  def run(x):
    for s in range(steps):
      x = t.gossip(x, jnp.int32(s))
    return x

  return jax.jit(wk.run_per_worker(run, mesh)), mesh


@pytest.mark.parametrize("name,w", [(n, w) for n, w in ALL if w in (1, 4, 8, 9, 16)])
def test_gossip_matches_dense_matrix_and_preserves_mean(name, w):
  t = _build(name, w)
  steps = max(2, t.period + 1)
  rng = np.random.default_rng(w)
  x0 = {"a": rng.normal(size=(w, 3, 4)).astype(np.float32),
        "b": rng.normal(size=(w,)).astype(np.float32)}
  f, mesh = _gossip_fn(t, steps)
  got = jax.device_get(f(wk.shard(jax.tree.map(jnp.asarray, x0), mesh)))
  for k, v in x0.items():
    ref = v.astype(np.float64).reshape(w, -1)
    for s in range(steps):
      ref = t.matrix(s) @ ref
    ref = ref.reshape(v.shape)
    # float32 gossip vs float64 reference: a few roundings per step
    np.testing.assert_allclose(got[k], ref, rtol=0, atol=1e-5 * steps, err_msg=k)
    # doubly stochastic mixing preserves the mean (up to float32 rounding)
    np.testing.assert_allclose(got[k].astype(np.float64).mean(0),
                               v.astype(np.float64).mean(0), atol=1e-5 * steps)


def test_one_peer_exponential_averages_exactly_after_a_period():
  w = 8
  t = tp.one_peer_exponential(w)
  x0 = np.random.default_rng(0).normal(size=(w, 5)).astype(np.float32)
  f, mesh = _gossip_fn(t, t.period)
  got = np.asarray(f(wk.shard(jnp.asarray(x0), mesh)))
  np.testing.assert_allclose(got, np.broadcast_to(x0.mean(0), x0.shape), atol=1e-6)
  # time-varying: gossip without a step is an error
  with pytest.raises(ValueError, match="time-varying"):
    jax.jit(wk.run_per_worker(lambda x: t.gossip(x), mesh))(wk.shard(jnp.asarray(x0), mesh))


def test_nonuniform_weights_path():
  """Per-worker weights (a gathered table) give the same result as the dense matrix."""
  w = 6
  src = tuple((i + 1) % w for i in range(w))
  wt = np.linspace(0.1, 0.6, w)
  mix = tp.Mixing(w, 1 - wt, (tp.Term(src, wt),))
  t = tp.Topology("custom", w, (mix,))
  x0 = np.random.default_rng(1).normal(size=(w, 4)).astype(np.float32)
  f, mesh = _gossip_fn(t, 1)
  got = np.asarray(f(wk.shard(jnp.asarray(x0), mesh)))
  np.testing.assert_allclose(got, mix.matrix() @ x0.astype(np.float64), atol=1e-6)
  assert not tp.is_doubly_stochastic(mix.matrix())  # row-stochastic only: allowed


def test_unknown_topology():
  with pytest.raises(ValueError, match="unknown topology"):
    tp.make_topology("star", 4)
