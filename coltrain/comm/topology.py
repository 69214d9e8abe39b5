"""Communication topologies and their mixing (gossip) weights.

A mixing step is a sum of *permutation terms* with per-worker weights:

    x_i' = w_self[i] * x_i + sum_j w_j[i] * x_{src_j[i]}
         = x_i + sum_j w_j[i] * (x_{src_j[i]} - x_i)     (how it is computed)

where each `src_j` is a permutation of the W workers (worker i pulls from src_j[i]),
so every term is one `workers.pull` (ppermute + local gathers) and gossip needs no dense
W x W matrix on device. The equivalent dense mixing matrix (host numpy, float64) has
M[i, i] = w_self[i] and M[i, src_j[i]] = w_j[i]; `Mixing.matrix()` builds it.

Topologies (all circulant or 2-D torus shifts, so every worker has the same degree):

  ring(W)                 neighbours i +- 1; Metropolis-Hastings (MH) weights 1/3
                          (W = 2: one neighbour, weight 1/2).
  torus(W)                r x c grid, r <= c, r * c = W as square as possible,
                          neighbours +-1 along each axis with wrap-around; MH weights.
  exponential(W)          static exponential graph (Ying et al. 2021, "Exponential
                          graph is provably efficient for decentralized deep training"):
                          worker i pulls from i + 2^k (mod W), k = 0 .. ceil(log2 W) - 1,
                          all weights 1/(tau + 1), tau = number of distinct peers
                          (directed; doubly stochastic, not symmetric). With
                          `symmetric=True`: undirected neighbours i +- 2^k, MH weights.
  one_peer_exponential(W) time-varying (Ying et al. 2021): at step t worker i averages
                          with i + 2^(t mod tau), tau = ceil(log2 W): weights 1/2, 1/2.
                          For W a power of two, tau consecutive steps average exactly.
  complete(W)             everyone; MH weights are uniform 1/W (spectral gap 1).

Every mixing matrix here is doubly stochastic (rows and columns sum to 1), so gossip
preserves the worker mean. Time-varying topologies are a static tuple of phases; step t
uses phase t % period (`gossip` selects it with `lax.switch`).

The spectral gap is 1 - |lambda_2|, |lambda_2| the second largest eigenvalue modulus of
the mixing matrix (of the product over one period for time-varying topologies).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from coltrain.comm import workers as wk

TOPOLOGIES = ("ring", "torus", "exponential", "one_peer_exponential", "complete")


@dataclasses.dataclass(frozen=True, eq=False)
class Term:
  """One permutation term: worker i receives `weight[i] * x[src[i]]`."""

  src: tuple[int, ...]
  weight: np.ndarray  # float64 (W,)


@dataclasses.dataclass(frozen=True, eq=False)
class Mixing:
  """x_i' = self_weight[i] * x_i + sum_j terms[j].weight[i] * x[terms[j].src[i]]."""

  num_workers: int
  self_weight: np.ndarray  # float64 (W,)
  terms: tuple[Term, ...]

  def matrix(self) -> np.ndarray:
    """The dense (W, W) float64 mixing matrix M: x' = M @ x."""
    w = self.num_workers
    m = np.zeros((w, w))
    m[np.arange(w), np.arange(w)] += self.self_weight
    for t in self.terms:
      m[np.arange(w), np.asarray(t.src)] += t.weight
    return m

  def out_degree(self) -> np.ndarray:
    """int64 (W,): how many other workers each worker's value is sent to (the terms in
    which it is a source with non-zero weight)."""
    deg = np.zeros(self.num_workers, np.int64)
    for t in self.terms:
      used = t.weight != 0
      np.add.at(deg, np.asarray(t.src)[used], 1)
    return deg

  def apply(self, x: Any) -> Any:
    """Gossip inside shard_map: x is a stacked (L, ...) pytree block.

    Computes x_i' = x_i + sum_j w_j[i] * (x_{src_j[i]} - x_i) (equal to the mixing
    formula because each row of weights sums to 1), accumulating the terms in order in
    each leaf's dtype. The communication is `workers.pull` only (bit-exact for every
    device count D).

    Why this form: XLA's CPU (and GPU) backends contract `a * b + c` into fused
    multiply-adds, and with w_self * x_i + w_1 * y_1 + ... which products get fused
    depends on the fusion XLA picks for the local block shape, so bits could change
    with L = W / D. In the difference form every addition has exactly one product
    operand (acc + w_j * d_j), so the contraction is unambiguous; and weights that are
    equal for every worker (all the regular topologies here) are scalar constants, so
    the HLO does not depend on L either. Together these make gossip bitwise
    reproducible across D in the tests (checked for D in {1, 2, 4, 8}).
    """
    l_count = wk._local_count(x)
    idx = wk.worker_index(l_count)

    def weights(w):
      w32 = np.asarray(w, np.float32)
      if (w32 == w32[0]).all():
        return float(w32[0])
      return jnp.asarray(w32)[idx]

    def scale(v, w):
      if isinstance(w, float):
        return jnp.asarray(w, v.dtype) * v
      return w.astype(v.dtype).reshape((l_count,) + (1,) * (v.ndim - 1)) * v

    acc = x
    for t in self.terms:
      wt = weights(t.weight)
      y = wk.pull(x, t.src)
      acc = jax.tree.map(lambda a, v, u: a + scale(v - u, wt), acc, y, x)
    return wk._as_varying(acc)


@dataclasses.dataclass(frozen=True, eq=False)
class Topology:
  """A (possibly time-varying) topology: step t mixes with phases[t % period]."""

  name: str
  num_workers: int
  phases: tuple[Mixing, ...]

  @property
  def period(self) -> int:
    return len(self.phases)

  @property
  def time_varying(self) -> bool:
    return self.period > 1

  def mixing(self, step: int) -> Mixing:
    return self.phases[step % self.period]

  def matrix(self, step: int = 0) -> np.ndarray:
    return self.mixing(step).matrix()

  def period_matrix(self) -> np.ndarray:
    """M_{p-1} @ ... @ M_1 @ M_0: the mixing of one whole period."""
    m = np.eye(self.num_workers)
    for ph in self.phases:
      m = ph.matrix() @ m
    return m

  def spectral_gap(self) -> float:
    """1 - |lambda_2| of the (period) mixing matrix; 1 for W = 1."""
    return spectral_gap(self.period_matrix())

  def out_degree(self, step: int = 0) -> np.ndarray:
    return self.mixing(step).out_degree()

  def gossip(self, x: Any, step: Optional[jax.Array] = None) -> Any:
    """One gossip step inside shard_map on a stacked pytree block; `step` (int32 scalar,
    the same on every worker) selects the phase of a time-varying topology."""
    if self.period == 1:
      return self.phases[0].apply(x)
    if step is None:
      raise ValueError(f"topology '{self.name}' is time-varying: gossip needs the step")
    branches = [ph.apply for ph in self.phases]
    return lax.switch(jnp.asarray(step, jnp.int32) % self.period, branches, x)


def spectral_gap(m: np.ndarray) -> float:
  """1 - (second largest eigenvalue modulus) of a square matrix; 1.0 for 1 x 1."""
  if m.shape[0] == 1:
    return 1.0
  ev = np.sort(np.abs(np.linalg.eigvals(m)))[::-1]
  return float(1.0 - ev[1])


def is_doubly_stochastic(m: np.ndarray, tol: float = 1e-12) -> bool:
  return bool(np.all(m >= -tol) and np.allclose(m.sum(0), 1, atol=tol)
              and np.allclose(m.sum(1), 1, atol=tol))


# --------------------------------------------------------------------------------------
# Construction
# --------------------------------------------------------------------------------------

def _grid(num_workers: int) -> tuple[int, int]:
  """r x c = W with r <= c and r as large as possible (as square as possible)."""
  r = int(math.isqrt(num_workers))
  while num_workers % r:
    r -= 1
  return r, num_workers // r


def _shift_perm(shape: tuple[int, int], shift: tuple[int, int]) -> tuple[int, ...]:
  """src[i] for pulling from the worker at (row + dr, col + dc) on an r x c torus."""
  r, c = shape
  i = np.arange(r * c)
  row, col = i // c, i % c
  return tuple(int(v) for v in ((row + shift[0]) % r) * c + (col + shift[1]) % c)


def _from_shifts(name: str, num_workers: int, shape: tuple[int, int],
                 shifts: Sequence[tuple[int, int]], weighting: str) -> Mixing:
  """Mixing from torus shifts (distinct non-zero shifts give permutations that differ
  at every worker). weighting: 'mh' (Metropolis-Hastings on the undirected graph; the
  shift set must be closed under negation) or 'uniform' (1 / (peers + 1))."""
  w = num_workers
  perms: list[tuple[int, ...]] = []
  identity = tuple(range(w))
  for s in shifts:
    p = _shift_perm(shape, s)
    if p != identity and p not in perms:
      perms.append(p)
  if weighting == "uniform":
    wt = 1.0 / (len(perms) + 1)
    terms = tuple(Term(p, np.full(w, wt)) for p in perms)
    return Mixing(w, np.full(w, wt), terms)
  assert weighting == "mh", weighting
  adj = np.zeros((w, w), bool)
  for p in perms:
    adj[np.arange(w), np.asarray(p)] = True
  if not (adj == adj.T).all():
    raise ValueError(f"{name}: MH weights need an undirected graph")
  deg = adj.sum(1)
  terms = []
  for p in perms:
    j = np.asarray(p)
    terms.append(Term(p, 1.0 / (1.0 + np.maximum(deg, deg[j]))))
  self_w = 1.0 - sum(t.weight for t in terms) if terms else np.ones(w)
  return Mixing(w, np.asarray(self_w, np.float64), tuple(terms))


def metropolis_hastings(adjacency: np.ndarray) -> np.ndarray:
  """Dense MH weights of an undirected graph (bool (W, W), no self loops):
  M_ij = 1 / (1 + max(deg_i, deg_j)) on edges, M_ii = 1 - sum_j M_ij."""
  a = np.asarray(adjacency, bool) & ~np.eye(len(adjacency), dtype=bool)
  deg = a.sum(1)
  m = np.where(a, 1.0 / (1.0 + np.maximum(deg[:, None], deg[None, :])), 0.0)
  m[np.diag_indices_from(m)] = 1.0 - m.sum(1)
  return m


def _check_w(num_workers: int) -> int:
  if not isinstance(num_workers, (int, np.integer)) or num_workers < 1:
    raise ValueError(f"num_workers must be an int >= 1, got {num_workers!r}")
  return int(num_workers)


def ring(num_workers: int) -> Topology:
  w = _check_w(num_workers)
  return Topology("ring", w, (_from_shifts("ring", w, (1, w), [(0, 1), (0, -1)], "mh"),))


def torus(num_workers: int) -> Topology:
  """2-D torus r x c (r <= c, as square as possible). Needs W >= 4 with a factorisation
  r, c >= 2 (W prime would be a ring); `comm.validate_comm` reports that."""
  w = _check_w(num_workers)
  r, c = _grid(w)
  if r < 2:
    raise ValueError(f"torus needs W = r * c with r, c >= 2; {w} workers only make a ring")
  shifts = [(1, 0), (-1, 0), (0, 1), (0, -1)]
  return Topology("torus", w, (_from_shifts("torus", w, (r, c), shifts, "mh"),))


def _tau(w: int) -> int:
  return max(1, math.ceil(math.log2(w))) if w > 1 else 0


def exponential(num_workers: int, symmetric: bool = False) -> Topology:
  w = _check_w(num_workers)
  ks = [2**k for k in range(_tau(w))]
  if symmetric:
    shifts = [(0, s) for s in ks] + [(0, -s) for s in ks]
    return Topology("exponential", w, (_from_shifts("exponential", w, (1, w), shifts, "mh"),))
  return Topology("exponential", w,
                  (_from_shifts("exponential", w, (1, w), [(0, s) for s in ks], "uniform"),))


def one_peer_exponential(num_workers: int) -> Topology:
  w = _check_w(num_workers)
  tau = _tau(w)
  if tau == 0:
    return Topology("one_peer_exponential", w, (Mixing(w, np.ones(w), ()),))
  phases = tuple(_from_shifts("one_peer_exponential", w, (1, w), [(0, 2**k)], "uniform")
                 for k in range(tau))
  return Topology("one_peer_exponential", w, phases)


def complete(num_workers: int) -> Topology:
  w = _check_w(num_workers)
  return Topology("complete", w,
                  (_from_shifts("complete", w, (1, w), [(0, s) for s in range(1, w)], "mh"),))


_BUILDERS: dict[str, Callable[[int], Topology]] = {
    "ring": ring, "torus": torus, "exponential": exponential,
    "one_peer_exponential": one_peer_exponential, "complete": complete,
}


def make_topology(name: str, num_workers: int) -> Topology:
  """The topology `name` (one of TOPOLOGIES) on `num_workers` workers."""
  if name not in _BUILDERS:
    raise ValueError(f"unknown topology '{name}'; known: {', '.join(TOPOLOGIES)}")
  return _BUILDERS[name](num_workers)


def gossip(x: Any, topology: Topology, step: Optional[jax.Array] = None) -> Any:
  """Inside shard_map: one mixing step of the stacked pytree block x."""
  return topology.gossip(x, step)
