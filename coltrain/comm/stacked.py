"""Glue for a multi-worker train step: per-worker local gradients + an `Algorithm`.

    init = init_workers(params, model_state, tx, alg, mesh)        # stacked + sharded
    step_fn = jax.jit(make_stacked_step(local_grad, alg, mesh), donate_argnums=(0, 1, 2, 3))
    params, opt_state, model_state, comm_state, metrics = step_fn(
        params, opt_state, model_state, comm_state, split_batch(batch, W, mesh), step, rng)

`local_grad(params, model_state, batch, key) -> (grads, new_model_state, metrics)` is
ONE worker's computation on its share of the batch (no communication; metrics a dict of
scalars). The step runs it for the L local workers one after another (`lax.map`, so the
per-worker program is the same for any L), then `alg.step`,
all inside one `shard_map`. Every output (and every metric) keeps the leading worker
axis: metrics come back as (W,) arrays, including `bytes_sent` and, if tracked,
`consensus_distance` (the same on all workers); average them on the host.

Randomness: step t uses key_t = fold_in(rng, t) (as the single-worker train step does);
worker g's local key is fold_in(key_t, g) when W > 1 and key_t itself when W = 1, so a
one-worker run draws exactly the single-worker numbers. The algorithm gets key_t.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import jax
from jax import lax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from coltrain.comm import workers as wk
from coltrain.comm.algorithms import Algorithm

PyTree = Any
LocalGrad = Callable[[PyTree, PyTree, PyTree, jax.Array], tuple[PyTree, PyTree, dict]]


def init_workers(params: PyTree, model_state: PyTree, tx: optax.GradientTransformation,
                 alg: Algorithm, mesh: Mesh) -> tuple[PyTree, PyTree, PyTree, PyTree]:
  """ONE worker's initial params/model_state -> W identical stacked copies, their
  optimizer states and the algorithm's comm state, all sharded over `mesh`:
  (params, opt_state, model_state, comm_state)."""
  w = alg.num_workers
  sp = wk.shard(wk.stack(params, w), mesh)
  sm = wk.shard(wk.stack(model_state, w), mesh) if jax.tree.leaves(model_state) else model_state
  opt = jax.jit(jax.vmap(tx.init))(sp)
  comm = jax.jit(alg.init)(sp)
  return sp, wk.shard(opt, mesh), sm, _shard_or_empty(comm, mesh)


def _shard_or_empty(tree, mesh):
  return wk.shard(tree, mesh) if jax.tree.leaves(tree) else tree


def split_batch(batch: PyTree, num_workers: int, mesh: Optional[Mesh] = None) -> PyTree:
  """(B, ...) leaves -> (W, B / W, ...): worker g gets examples g*B/W ... (g+1)*B/W - 1
  (sharded over `mesh` if given). Raises ValueError if W does not divide B."""

  def one(x):
    b = x.shape[0]
    if b % num_workers:
      raise ValueError(f"batch of {b} does not split over {num_workers} workers")
    return jnp.reshape(x, (num_workers, b // num_workers) + tuple(x.shape[1:]))

  out = jax.tree.map(one, batch)
  return wk.shard(out, mesh) if mesh is not None else out


def make_stacked_step(local_grad: LocalGrad, alg: Algorithm, mesh: Mesh, *,
                      check_vma: bool = True) -> Callable:
  """step(params, opt_state, model_state, comm_state, batch, step, rng) ->
  (params, opt_state, model_state, comm_state, metrics); see the module doc. `step`
  (int32 scalar) and `rng` (the run's base key) are replicated; everything else is
  stacked over the workers. Not jitted (jit it, donating the states)."""
  w = alg.num_workers

  def device_fn(params, opt_state, model_state, comm_state, batch, step, rng):
    l_count = wk._local_count(params)
    key_t = jax.random.fold_in(rng, step)
    if w == 1:
      keys = jnp.broadcast_to(key_t[None], (l_count,) + key_t.shape)
    else:
      keys = wk.worker_keys(key_t, l_count)
    # lax.map, not vmap: each worker runs the same per-worker program whatever the number
    # L of workers stacked on a device, so results do not depend on the device count.
    grads, model_state, metrics = lax.map(lambda a: local_grad(*a),
                                          (params, model_state, batch, keys))
    params, opt_state, comm_state, stats = alg.step(params, grads, opt_state, comm_state,
                                                    step, key_t)
    return params, opt_state, model_state, comm_state, {**metrics, **stats}

  return wk.run_per_worker(device_fn, mesh, replicated_args=(5, 6), check_vma=check_vma)
