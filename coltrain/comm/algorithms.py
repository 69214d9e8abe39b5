"""Data-parallel and decentralized training algorithms over stacked workers.

Every algorithm is an `Algorithm` whose functions run INSIDE `jax.shard_map` on the
stacked local block (leading axis L of every leaf; see `coltrain.comm.workers`):

  comm_state = alg.init(params)
  params, opt_state, comm_state, stats = alg.step(params, grads, opt_state, comm_state,
                                                  step, key)

  params, grads, opt_state, comm_state: stacked (L, ...) pytrees (opt_state from
    `init_opt_state(tx, params)`, i.e. `jax.vmap(tx.init)`);
  step: int32 scalar, the global step t (the same on every worker; selects the phase of
    a time-varying topology and the local-SGD sync steps);
  key: a PRNG key for this step, the same on every worker (e.g. fold_in(rng, t)); worker
    g compresses with fold_in(fold_in(key, COMM_SALT), g), so receivers can re-derive
    a sender's key (rand_k indices) from public values;
  stats: {"bytes_sent": float32 (L,), and if track_consensus
          "consensus_distance": float32 (L,) (the same value on every worker)}.

`init` needs no communication (it copies/zeros per worker), so it may also be called
outside shard_map on the global stacked params.

Algorithms (x: params, g: this worker's gradient, U(.): the optax update of `tx`,
W_ij: the topology's mixing weights; "gossip" is `Topology.gossip`):

  allreduce   g_bar = mean_i C(g_i + e_i) (error feedback optional; C = identity for
              compressor none), x <- x + U(g_bar). Synchronous data parallel SGD.
  dpsgd       x_i <- sum_j W_ij (x_i + U(g_i))  (local step, then gossip; Lian et al.
              2017, adapt-then-combine).
  choco       CHOCO-SGD (Koloskova et al. 2019, Alg. 1): x_i' = x_i + U(g_i);
              q_i = C(x_i' - x_hat_i); x_hat_j += q_j for self and neighbours;
              x_i <- x_i' + gamma sum_j W_ij (x_hat_j - x_hat_i). Each worker keeps only
              its own public copy x_hat_i in comm state; the neighbours' copies are
              read with `pull` (every replica of x_hat_j is updated with the same q_j, so
              they are bitwise equal to x_hat_j); only q is counted as sent. x_hat starts
              at the initial params (known to all: same seed). Identity compressor +
              gamma = 1 is D-PSGD up to float rounding.
  gradient_tracking  DSGD with gradient tracking (Nedic et al. 2017 "DIGing", Pu &
              Nedic 2020): y_i^t = sum_j W_ij y_j^{t-1} + g_i^t - g_i^{t-1} (y^0 = g^0),
              x_i <- sum_j W_ij (x_i + U(y_i^t)). Two gossip rounds per step.
  local_sgd   x_i <- x_i + U(g_i); on steps with (t + 1) % local_steps == 0 the models
              are replaced by their exact average (optimizer states stay local).
  powersgd    PowerSGD (Vogels et al. 2019, Alg. 1 + 2): M_i = g_i + e_i per matrix
              leaf; P = mean_i M_i Q; P_hat = orth(P); Q_i = M_i^T P_hat;
              e_i <- M_i - P_hat Q_i^T; Q <- mean_i Q_i (warm start for the next step);
              g_bar = P_hat Q^T; rank-0/1 leaves are averaged uncompressed.
              x <- x + U(g_bar).

Bytes (`stats["bytes_sent"]`, and exactly in float64 from `Algorithm.bytes_per_step`):
bytes a worker puts on the wire this step, under these implementations:
  - uncompressed or linear allreduce (allreduce with compressor none, local_sgd's
    average, powersgd's P and Q): bandwidth-optimal ring allreduce, 2 (W-1)/W * B for
    a message of B bytes;
  - compressed allreduce (non-linear compressors): ring all-gather of the payloads,
    (W-1) * payload bytes;
  - gossip (dpsgd, choco, gradient_tracking): point-to-point, the message (model, y, or
    choco's q payload) times the number of peers the worker sends to in this step's
    phase (`Mixing.out_degree`).
W = 1 sends 0 bytes. Model/gradient messages are counted at the params' dtypes.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from coltrain.comm import compressors as comp
from coltrain.comm import topology as topo
from coltrain.comm import workers as wk
from coltrain.comm.compressors import Compressor
from coltrain.comm.topology import Topology

PyTree = Any
ALGORITHMS = ("allreduce", "dpsgd", "choco", "gradient_tracking", "local_sgd", "powersgd")
COMM_SALT = 0x636F6D6D  # "comm": decorrelates compression randomness from dropout keys

_HIGHEST = lax.Precision.HIGHEST


@dataclasses.dataclass(frozen=True, eq=False)
class Algorithm:
  """A communication algorithm for stacked workers (see module doc).

  init(params) -> comm_state; step(params, grads, opt_state, comm_state, step, key) ->
  (params, opt_state, comm_state, stats); bytes_per_step(step, params_like) -> float64
  (W,) exact bytes each worker sends at `step` (params_like: ONE worker's params or
  their ShapeDtypeStructs).
  """

  name: str
  num_workers: int
  init: Callable[[PyTree], PyTree]
  step: Callable[..., tuple[PyTree, PyTree, PyTree, dict]]
  bytes_per_step: Callable[[int, PyTree], np.ndarray]
  topology: Optional[Topology] = None
  compressor: Optional[Compressor] = None


# --------------------------------------------------------------------------------------
# Shared pieces
# --------------------------------------------------------------------------------------

def init_opt_state(tx: optax.GradientTransformation, params: PyTree) -> PyTree:
  """Per-worker optimizer states for stacked params: `jax.vmap(tx.init)(params)`."""
  return jax.vmap(tx.init)(params)


def _local_update(tx, grads, opt_state, params):
  updates, opt_state = jax.vmap(tx.update)(grads, opt_state, params)
  return optax.apply_updates(params, updates), opt_state


def _single_like(params: PyTree) -> PyTree:
  """ShapeDtypeStructs of ONE worker's slice of a stacked pytree."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(tuple(x.shape[1:]), x.dtype), params)


def _as_like(params_like: PyTree) -> PyTree:
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(tuple(jnp.shape(x)), jnp.result_type(x)),
                      params_like)


def payload_nbytes(c: Compressor, params_like: PyTree) -> int:
  """Bytes of one worker's payload for params of this structure (static)."""
  like = _as_like(params_like)
  state = jax.eval_shape(c.init, like)
  key = jax.ShapeDtypeStruct((2,), jnp.uint32)
  payload = jax.eval_shape(lambda x, s, k: c.compress(x, s, k)[0], like, state, key)
  return comp.tree_nbytes(payload)


def ring_allreduce_bytes(nbytes: float, num_workers: int) -> float:
  return 2.0 * (num_workers - 1) / num_workers * nbytes


def allgather_bytes(nbytes: float, num_workers: int) -> float:
  return float((num_workers - 1) * nbytes)


def _comm_keys(key, num_local):
  return wk.worker_keys(jax.random.fold_in(key, COMM_SALT), num_local)


def consensus_distance(params: PyTree, exact: bool = False) -> jax.Array:
  """Inside shard_map: (1/W) sum_i ||x_i - x_bar||^2 (squared 2-norm over all parameters,
  float32), returned as (L,) with the same value for every worker. Uses `workers.mean`
  (see there for `exact`)."""
  xbar = wk.mean(params, exact)
  l_count = wk._local_count(params)
  sq = [jnp.sum(jnp.square((a - b).astype(jnp.float32)).reshape(l_count, -1), axis=1)
        for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(xbar))]
  per_worker = sq[0]
  for s in sq[1:]:
    per_worker = per_worker + s
  return wk.mean(per_worker, exact)


def average_params(params: PyTree, exact: bool = False) -> PyTree:
  """Inside shard_map: x_bar = mean of the workers' params on every worker (e.g. to
  evaluate the averaged model)."""
  return wk.mean(params, exact)


def _stats(bytes_table: np.ndarray, step, num_local: int, params, track_consensus: bool,
           exact: bool) -> dict:
  """bytes_table: float64 (T, W); row step % T is this step's per-worker bytes."""
  idx = wk.worker_index(num_local)
  table = jnp.asarray(bytes_table.astype(np.float32))
  row = table[0] if bytes_table.shape[0] == 1 else table[jnp.asarray(step, jnp.int32)
                                                          % bytes_table.shape[0]]
  out = {"bytes_sent": wk._as_varying(row[idx])}
  if track_consensus:
    out["consensus_distance"] = consensus_distance(params, exact)
  return out


def _model_nbytes(params_like) -> int:
  return comp.tree_nbytes(_as_like(params_like))


def _gossip_table(t: Topology, message_bytes: float, rounds: int = 1) -> np.ndarray:
  return np.stack([ph.out_degree().astype(np.float64) * message_bytes * rounds
                   for ph in t.phases])


# --------------------------------------------------------------------------------------
# Algorithms
# --------------------------------------------------------------------------------------

def _identity_compressor(c: Optional[Compressor]) -> bool:
  return c is None or c.name in ("none", "ef(none)")


def allreduce(tx, num_workers: int, compressor: Optional[Compressor] = None, *,
              exact_mean: bool = False, track_consensus: bool = True) -> Algorithm:
  """Synchronous data parallel: average the (optionally compressed) gradients, then
  `tx`. Pass `with_error_feedback(c)` for error feedback."""
  w = num_workers
  c = None if _identity_compressor(compressor) else compressor

  def init(params):
    return {} if c is None else {"compressor": jax.vmap(c.init)(params)}

  def table(params_like):
    if c is None:
      return np.array([[ring_allreduce_bytes(_model_nbytes(params_like), w)] * w])
    return np.array([[allgather_bytes(payload_nbytes(c, params_like), w)] * w])

  def step(params, grads, opt_state, comm_state, step, key):
    l_count = wk._local_count(params)
    if c is None:
      gbar = wk.mean(grads, exact_mean)
    else:
      _, decoded, cs = jax.vmap(c.compress)(grads, comm_state["compressor"],
                                            _comm_keys(key, l_count))
      comm_state = {"compressor": cs}
      gbar = wk.mean(decoded, exact_mean)
    params, opt_state = _local_update(tx, gbar, opt_state, params)
    stats = _stats(table(_single_like(params)), step, l_count, params, track_consensus,
                   exact_mean)
    return params, opt_state, comm_state, stats

  return Algorithm("allreduce", w, init, step,
                   lambda t, like: table(like)[t % 1].copy(), None, compressor)


def dpsgd(tx, topology: Topology, *, exact_mean: bool = False,
          track_consensus: bool = True) -> Algorithm:
  """D-PSGD: local optimizer step, then one gossip step of the models."""

  def init(params):
    return {}

  def table(like):
    return _gossip_table(topology, _model_nbytes(like))

  def step(params, grads, opt_state, comm_state, step, key):
    l_count = wk._local_count(params)
    half, opt_state = _local_update(tx, grads, opt_state, params)
    params = topology.gossip(half, step)
    stats = _stats(table(_single_like(params)), step, l_count, params, track_consensus,
                   exact_mean)
    return params, opt_state, comm_state, stats

  return Algorithm("dpsgd", topology.num_workers, init, step,
                   lambda t, like: table(like)[t % topology.period].copy(), topology, None)


def choco(tx, topology: Topology, compressor: Compressor, gamma: float, *,
          exact_mean: bool = False, track_consensus: bool = True) -> Algorithm:
  """CHOCO-SGD with compressor C and consensus step size gamma (see module doc)."""
  c = compressor

  def init(params):
    return {"x_hat": jax.tree.map(lambda x: jnp.array(x, copy=True), params),
            "compressor": jax.vmap(c.init)(params)}

  def table(like):
    return _gossip_table(topology, payload_nbytes(c, like))

  def step(params, grads, opt_state, comm_state, step, key):
    l_count = wk._local_count(params)
    half, opt_state = _local_update(tx, grads, opt_state, params)
    x_hat = comm_state["x_hat"]
    diff = jax.tree.map(lambda a, b: a - b, half, x_hat)
    _, q, cs = jax.vmap(c.compress)(diff, comm_state["compressor"], _comm_keys(key, l_count))
    x_hat = jax.tree.map(lambda a, b: a + b, x_hat, q)
    mixed = topology.gossip(x_hat, step)
    g = jnp.float32(gamma)
    params = jax.tree.map(lambda h, m, s: h + g.astype(h.dtype) * (m - s), half, mixed, x_hat)
    stats = _stats(table(_single_like(params)), step, l_count, params, track_consensus,
                   exact_mean)
    return params, opt_state, {"x_hat": x_hat, "compressor": cs}, stats

  return Algorithm("choco", topology.num_workers, init, step,
                   lambda t, like: table(like)[t % topology.period].copy(), topology, c)


def gradient_tracking(tx, topology: Topology, *, exact_mean: bool = False,
                      track_consensus: bool = True) -> Algorithm:
  """DSGD with gradient tracking (see module doc); `tx` is applied to the tracker y."""

  def init(params):
    z = jax.tree.map(jnp.zeros_like, params)
    return {"y": z, "g_prev": jax.tree.map(jnp.zeros_like, params)}

  def table(like):
    return _gossip_table(topology, _model_nbytes(like), rounds=2)

  def step(params, grads, opt_state, comm_state, step, key):
    l_count = wk._local_count(params)
    mixed_y = topology.gossip(comm_state["y"], step)
    y = jax.tree.map(lambda m, g, gp: m + (g - gp), mixed_y, grads, comm_state["g_prev"])
    half, opt_state = _local_update(tx, y, opt_state, params)
    params = topology.gossip(half, step)
    stats = _stats(table(_single_like(params)), step, l_count, params, track_consensus,
                   exact_mean)
    return params, opt_state, {"y": y, "g_prev": grads}, stats

  return Algorithm("gradient_tracking", topology.num_workers, init, step,
                   lambda t, like: table(like)[t % topology.period].copy(), topology, None)


def local_sgd(tx, num_workers: int, local_steps: int, *, exact_mean: bool = False,
              track_consensus: bool = True) -> Algorithm:
  """Local SGD: independent steps; exact model average after every `local_steps`."""
  if local_steps < 1:
    raise ValueError(f"local_steps must be >= 1, got {local_steps}")
  w, h = num_workers, local_steps

  def init(params):
    return {}

  def table(like):
    t = np.zeros((h, w))
    t[h - 1] = ring_allreduce_bytes(_model_nbytes(like), w)  # step t syncs iff t % h == h-1
    return t

  def step(params, grads, opt_state, comm_state, step, key):
    l_count = wk._local_count(params)
    half, opt_state = _local_update(tx, grads, opt_state, params)
    if h == 1:
      params = wk.mean(half, exact_mean)
    else:
      sync = (jnp.asarray(step, jnp.int32) + 1) % h == 0
      params = lax.cond(sync, lambda x: wk.mean(x, exact_mean), wk._as_varying, half)
    stats = _stats(table(_single_like(params)), step, l_count, params, track_consensus,
                   exact_mean)
    return params, opt_state, comm_state, stats

  return Algorithm("local_sgd", w, init, step, lambda t, like: table(like)[t % h].copy())


def powersgd(tx, num_workers: int, rank: int, *, seed: int = 0, exact_mean: bool = False,
             track_consensus: bool = True) -> Algorithm:
  """PowerSGD gradient allreduce with error feedback and warm start (Vogels et al.)."""
  if rank < 1:
    raise ValueError(f"powersgd rank must be >= 1, got {rank}")
  w = num_workers

  def init(params):
    leaves = jax.tree.leaves(params)
    qs = []
    for i, x in enumerate(leaves):
      shape = tuple(x.shape[1:])
      if comp.matrix_shape(shape) is None:
        qs.append(None)
      else:
        q = comp.init_q(shape, rank, seed, i)
        qs.append(jnp.broadcast_to(q[None], (x.shape[0],) + q.shape))
    return {"error": jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32), params),
            "q": tuple(qs)}

  def message_bytes(like):
    total = 0
    for x in jax.tree.leaves(_as_like(like)):
      ms = comp.matrix_shape(tuple(x.shape))
      if ms is None:
        total += int(np.prod(x.shape)) * 4
      else:
        total += 4 * comp.powersgd_rank(tuple(x.shape), rank) * (ms[0] + ms[1])
    return total

  def table(like):
    return np.array([[ring_allreduce_bytes(message_bytes(like), w)] * w])

  def step(params, grads, opt_state, comm_state, step, key):
    l_count = wk._local_count(params)
    g_leaves, treedef = jax.tree.flatten(grads)
    e_leaves = jax.tree.leaves(comm_state["error"])
    qs = comm_state["q"]
    ms = [g.astype(jnp.float32) + e for g, e in zip(g_leaves, e_leaves)]
    mats = {}
    for i, m in enumerate(ms):
      shp = comp.matrix_shape(tuple(m.shape[1:]))
      if shp is not None:
        mats[i] = m.reshape((l_count,) + shp)
    # round 1: P = mean_i M_i Q (and the uncompressed rank-0/1 leaves)
    ps = {i: jnp.matmul(mats[i], qs[i], precision=_HIGHEST) for i in mats}
    vec = {i: m for i, m in enumerate(ms) if i not in mats}
    ps, vec = wk.mean((ps, vec), exact_mean)
    p_hat = {i: jax.vmap(comp.orthogonalize)(p) for i, p in ps.items()}
    # round 2: Q_i = M_i^T P_hat; local error; Q = mean_i Q_i
    q_loc = {i: jnp.matmul(jnp.swapaxes(mats[i], 1, 2), p_hat[i], precision=_HIGHEST)
             for i in mats}
    new_e, gbar = [], []
    for i, m in enumerate(ms):
      if i in mats:
        approx = jnp.matmul(p_hat[i], jnp.swapaxes(q_loc[i], 1, 2), precision=_HIGHEST)
        new_e.append(m - approx.reshape(m.shape))
      else:
        new_e.append(jnp.zeros_like(m))
    q_mean = wk.mean(q_loc, exact_mean) if q_loc else {}
    for i, m in enumerate(ms):
      if i in mats:
        g = jnp.matmul(p_hat[i], jnp.swapaxes(q_mean[i], 1, 2), precision=_HIGHEST)
        gbar.append(g.reshape(m.shape).astype(g_leaves[i].dtype))
      else:
        gbar.append(vec[i].astype(g_leaves[i].dtype))
    gbar = jax.tree.unflatten(treedef, gbar)
    new_q = tuple(q_mean[i] if i in mats else None for i in range(len(ms)))
    comm_state = {"error": jax.tree.unflatten(treedef, new_e), "q": new_q}
    params, opt_state = _local_update(tx, gbar, opt_state, params)
    stats = _stats(table(_single_like(params)), step, l_count, params, track_consensus,
                   exact_mean)
    return params, opt_state, comm_state, stats

  return Algorithm("powersgd", w, init, step, lambda t, like: table(like)[0].copy())


# --------------------------------------------------------------------------------------
# From config
# --------------------------------------------------------------------------------------

def make_algorithm(comm_cfg: Mapping, topology: Optional[Topology] = None,
                   compressor: Optional[Compressor] = None,
                   tx: Optional[optax.GradientTransformation] = None,
                   num_workers: Optional[int] = None, *, track_consensus: bool = True,
                   seed: int = 0, backend: str = "jax", hw_plugin: str = "") -> Algorithm:
  """The `comm.algorithm` of a (validated) comm config group.

  topology / compressor / num_workers default to the ones the config names
  (`comm.topology`, `comm.compressor` with `comm.error_feedback` for allreduce,
  `comm.workers`). `tx` is required. backend "hw" (numerics.backend) packs bfp payloads
  and selects top_k entries with the hardware plugin's custom calls (same bytes).
  Raises ValueError listing the config's problems.
  """
  from coltrain.comm.config import resolve, validate_comm
  cfg = resolve(comm_cfg)
  problems = validate_comm(cfg)
  if problems:
    raise ValueError("invalid comm config:\n  - " + "\n  - ".join(problems))
  if tx is None:
    raise ValueError("make_algorithm needs the optimizer `tx`")
  w = int(num_workers if num_workers is not None else cfg["workers"])
  exact = bool(cfg["exact_mean"])
  name = cfg["algorithm"]
  kw = dict(exact_mean=exact, track_consensus=track_consensus)
  if name in ("dpsgd", "choco", "gradient_tracking") and topology is None:
    topology = topo.make_topology(cfg["topology"], w)
  if topology is not None and topology.num_workers != w:
    raise ValueError(f"topology has {topology.num_workers} workers, expected {w}")
  if name == "allreduce":
    if compressor is None:
      compressor = comp.make_compressor(cfg["compressor"], ratio=cfg["ratio"],
                                        levels=cfg["levels"], rank=cfg["rank"],
                                        error_feedback=cfg["error_feedback"], seed=seed,
                                        backend=backend, hw_plugin=hw_plugin)
    return allreduce(tx, w, compressor, **kw)
  if name == "dpsgd":
    return dpsgd(tx, topology, **kw)
  if name == "choco":
    if compressor is None:
      compressor = comp.make_compressor(cfg["compressor"], ratio=cfg["ratio"],
                                        levels=cfg["levels"], rank=cfg["rank"], seed=seed,
                                        backend=backend, hw_plugin=hw_plugin)
    return choco(tx, topology, compressor, cfg["gamma"], **kw)
  if name == "gradient_tracking":
    return gradient_tracking(tx, topology, **kw)
  if name == "local_sgd":
    return local_sgd(tx, w, cfg["local_steps"], **kw)
  if name == "powersgd":
    return powersgd(tx, w, cfg["rank"], seed=seed, **kw)
  raise ValueError(f"unknown algorithm '{name}'")  # pragma: no cover (validated)
