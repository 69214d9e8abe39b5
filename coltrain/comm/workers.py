"""The worker axis: W simulated workers stacked along a leading axis, sharded over devices.

Layout. Every per-worker quantity (params, optimizer state, comm state, batches) is a
pytree whose leaves carry a leading *worker axis* of size W. On the host that axis is
sharded over the 1-D mesh axis `AXIS` ("workers") of D devices (W % D == 0), so device d
holds the contiguous block of L = W / D workers d*L, ..., d*L + L - 1 (global worker
g = d*L + l for local slot l). Inside `jax.shard_map` a function sees its (L, ...)
block; the primitives here communicate over the worker axis with collectives over
`AXIS` plus local gathers over the L slots, so one code path serves D = 1 (all W workers
on one device, collectives over a size-1 axis) up to D = W (one worker per device).

In-shard_map primitives (every input and output is a stacked (L, ...) block, or a pytree
of them; outputs are marked varying over `AXIS` so they work under `check_vma=True`):
  permute(x, perm)   worker g's value moves to worker perm[g] (static permutation of W)
  pull(x, src)       worker i receives worker src[i]'s value (= permute by src^-1)
  mean(x, exact)     the mean over all W workers, on every worker
  gather(x)          all W values on every worker: (L, W, ...)
  worker_index(L)    int32 (L,) global indices of the local block
  num_workers(L)     W = L * D (a static int)

Host helpers: make_mesh, shard, replicate, stack, unstack, run_per_worker.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

AXIS = "workers"

PyTree = Any


# --------------------------------------------------------------------------------------
# Host helpers
# --------------------------------------------------------------------------------------

def make_mesh(num_devices: Optional[int] = None,
              devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
  """A 1-D `Mesh` with the single axis `AXIS` over `devices` (default: the first
  `num_devices` of `jax.devices()`, all of them if None).

  Built as `jax.sharding.Mesh` directly (Auto axis type): plain `jax.device_put` with a
  `NamedSharding` then places arrays for `shard_map` without Explicit-axis bookkeeping.
  """
  if devices is None:
    devices = jax.devices()
    if num_devices is not None:
      if not 1 <= num_devices <= len(devices):
        raise ValueError(f"num_devices must be in [1, {len(devices)}], got {num_devices}")
      devices = devices[:num_devices]
  return Mesh(np.asarray(devices), (AXIS,))


def _check_workers(num_workers: int, mesh: Mesh) -> int:
  d = mesh.shape[AXIS]
  if num_workers % d:
    raise ValueError(f"{num_workers} workers cannot be split over {d} devices "
                     f"(W % D must be 0)")
  return num_workers // d


def shard(tree: PyTree, mesh: Mesh) -> PyTree:
  """Places a stacked pytree (leading worker axis W on every leaf) on `mesh`, the worker
  axis split over `AXIS`. Raises ValueError if W % D != 0 or leaves disagree on W."""
  leaves = jax.tree.leaves(tree)
  ws = {np.shape(x)[0] if np.ndim(x) else None for x in leaves}
  if None in ws or len(ws) > 1:
    raise ValueError(f"every leaf needs the same leading worker axis, got sizes {ws}")
  if ws:
    _check_workers(ws.pop(), mesh)
  return jax.device_put(tree, NamedSharding(mesh, P(AXIS)))


def replicate(tree: PyTree, mesh: Mesh) -> PyTree:
  """Places `tree` fully replicated on `mesh` (for step counters, base keys)."""
  return jax.device_put(tree, NamedSharding(mesh, P()))


def stack(tree: PyTree, num_workers: int) -> PyTree:
  """W identical copies of a single-worker pytree along a new leading axis."""
  return jax.tree.map(lambda x: jnp.broadcast_to(jnp.asarray(x)[None],
                                                 (num_workers,) + jnp.shape(x)), tree)


def unstack(tree: PyTree, worker: int = 0) -> PyTree:
  """Worker `worker`'s slice of a stacked pytree (host side)."""
  return jax.tree.map(lambda x: x[worker], tree)


def run_per_worker(fn: Callable, mesh: Mesh, *, replicated_args: Sequence[int] = (),
                   replicated_out: Any = None, check_vma: bool = True) -> Callable:
  """Wraps `fn` in `jax.shard_map` over `mesh` for the stacked-worker layout.

  Every positional argument is split along its leading worker axis (P(AXIS)), except
  those whose index is in `replicated_args` (P(): e.g. a scalar step or a base PRNG
  key). Outputs are split along the worker axis (P(AXIS)) unless `replicated_out` gives
  an out_specs pytree prefix of your own. Not jitted: wrap the result in `jax.jit`
  (donating what you like). Inputs should already be placed with `shard`/`replicate`
  (jit reshards otherwise).
  """
  rep = set(replicated_args)

  @functools.wraps(fn)
  def wrapped(*args):
    in_specs = tuple(P() if i in rep else P(AXIS) for i in range(len(args)))
    out_specs = P(AXIS) if replicated_out is None else replicated_out
    return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs,
                         check_vma=check_vma)(*args)

  return wrapped


# --------------------------------------------------------------------------------------
# In-shard_map primitives
# --------------------------------------------------------------------------------------

def num_devices() -> int:
  """D, the size of the `AXIS` mesh axis (static; call inside shard_map)."""
  return lax.axis_size(AXIS)


def num_workers(num_local: int) -> int:
  """W = L * D for a local block of `num_local` workers (static)."""
  return num_local * num_devices()


def worker_index(num_local: int) -> jax.Array:
  """int32 (L,): global indices d*L + l of this device's workers."""
  d = lax.axis_index(AXIS).astype(jnp.int32)
  return _as_varying(d * num_local + jnp.arange(num_local, dtype=jnp.int32))


def _as_varying(x: PyTree) -> PyTree:
  """Marks every leaf varying over AXIS (no-op for leaves that already are)."""

  def one(v):
    try:
      vary = jax.typeof(v).manual_axis_type.varying
    except AttributeError:  # pragma: no cover - other jax versions
      vary = frozenset()
    if AXIS in vary:
      return v
    try:
      return lax.pcast(v, (AXIS,), to="varying")
    except (ValueError, TypeError, NameError):  # check_vma=False / outside shard_map
      return v

  return jax.tree.map(one, x)


def _local_count(tree: PyTree) -> int:
  leaves = jax.tree.leaves(tree)
  if not leaves:
    raise ValueError("empty pytree")
  ls = {x.shape[0] if x.ndim else None for x in leaves}
  if None in ls or len(ls) != 1:
    raise ValueError(f"every leaf needs the same leading (local worker) axis, got {ls}")
  return ls.pop()


@dataclasses.dataclass(frozen=True)
class _PermutePlan:
  """How to realise a permutation of W = D*L stacked workers on D devices.

  For each device offset k != 0 used by the permutation, source device s gathers the
  rows it must send to device (s + k) % D into a buffer of M_k rows (`sends[k][s]`:
  local slots, padded with 0) and one `ppermute` by offset k moves all buffers. Each
  device then takes its L output rows out of concat([x] + buffers) at `recv[d]`.
  """

  sends: tuple[tuple[int, np.ndarray], ...]  # (offset k, int32 (D, M_k) local slots)
  recv: np.ndarray                           # int32 (D, L) rows of the concatenation
  identity: bool


@functools.lru_cache(maxsize=512)
def _plan(perm: tuple[int, ...], d_count: int, l_count: int) -> _PermutePlan:
  w = d_count * l_count
  src = np.empty(w, np.int64)
  src[np.asarray(perm)] = np.arange(w)  # src[h] = g with perm[g] = h
  offsets = sorted({(h // l_count - src[h] // l_count) % d_count for h in range(w)} - {0})
  sends, base = [], l_count
  recv = np.zeros((d_count, l_count), np.int32)
  for h in range(w):  # offset-0 rows come straight from x
    if (h // l_count - src[h] // l_count) % d_count == 0:
      recv[h // l_count, h % l_count] = src[h] % l_count
  for k in offsets:
    rows: list[list[int]] = [[] for _ in range(d_count)]
    for dd in range(d_count):
      s = (dd - k) % d_count
      for ld in range(l_count):
        g = src[dd * l_count + ld]
        if g // l_count == s:
          recv[dd, ld] = base + len(rows[s])
          rows[s].append(g % l_count)
    m = max(len(r) for r in rows)
    table = np.zeros((d_count, m), np.int32)
    for s, r in enumerate(rows):
      table[s, :len(r)] = r
    sends.append((k, table))
    base += m
  identity = not offsets and all(recv[d, l] == l for d in range(d_count)
                                 for l in range(l_count))
  return _PermutePlan(tuple(sends), recv, identity)


def _check_perm(perm: Sequence[int], w: int) -> tuple[int, ...]:
  perm = tuple(int(p) for p in perm)
  if len(perm) != w or sorted(perm) != list(range(w)):
    raise ValueError(f"expected a permutation of {w} workers, got {perm}")
  return perm


def permute(x: PyTree, perm: Sequence[int]) -> PyTree:
  """Moves worker g's value to worker perm[g] (a static permutation of all W workers).

  Realised as at most one `ppermute` per distinct device offset (source device ->
  destination device) the permutation uses, with compacted send buffers, plus local
  row gathers; no arithmetic, so the result is bit-exact whatever D is.
  """
  l_count = _local_count(x)
  d_count = num_devices()
  perm = _check_perm(perm, l_count * d_count)
  plan = _plan(perm, d_count, l_count)
  if plan.identity:
    return x
  d = lax.axis_index(AXIS)
  parts = [x]
  for k, table in plan.sends:
    idx = jnp.asarray(table)[d]
    buf = jax.tree.map(lambda v: jnp.take(v, idx, axis=0), x)
    buf = lax.ppermute(buf, AXIS, [(s, (s + k) % d_count) for s in range(d_count)])
    parts.append(buf)
  ridx = jnp.asarray(plan.recv)[d]

  def assemble(*leaves):
    allrows = leaves[0] if len(leaves) == 1 else jnp.concatenate(leaves, axis=0)
    return jnp.take(allrows, ridx, axis=0)

  return _as_varying(jax.tree.map(assemble, *parts))


def inverse_permutation(perm: Sequence[int]) -> tuple[int, ...]:
  inv = np.empty(len(perm), np.int64)
  inv[np.asarray(perm, np.int64)] = np.arange(len(perm))
  return tuple(int(i) for i in inv)


def pull(x: PyTree, src: Sequence[int]) -> PyTree:
  """Worker i receives worker src[i]'s value (src a permutation): permute by src^-1."""
  return permute(x, inverse_permutation(src))


def mean(x: PyTree, exact: bool = False) -> PyTree:
  """The mean over all W workers of each leaf, broadcast back to every worker (L, ...).

  Reduction order:
    exact=False (default): each device sums its L slots left to right in slot order
      (((x_0 + x_1) + x_2) + ...), `psum`s the D partial sums (XLA's all-reduce: order
      implementation-defined, identical result on every device), then divides by W.
      With D = 1 this is the sequential sum over workers 0..W-1; on D > 1 results
      differ from D = 1 by float rounding only.
    exact=True: `all_gather`s all W values and sums them left to right in global worker
      order, then divides by W: bitwise identical for every D (and to exact=False with
      D = 1), at the cost of W copies of x in memory per device.
  """
  l_count = _local_count(x)
  w = num_workers(l_count)

  def seq_sum(v):
    acc = v[0]
    for i in range(1, v.shape[0]):
      acc = acc + v[i]
    return acc

  def one(v):
    if exact:
      total = seq_sum(lax.all_gather(v, AXIS, axis=0, tiled=True))
    else:
      total = lax.psum(seq_sum(v), AXIS)
    m = total / jnp.asarray(w, total.dtype)
    return jnp.broadcast_to(m[None], v.shape)

  return _as_varying(jax.tree.map(one, x))


def gather(x: PyTree) -> PyTree:
  """All W workers' values on every worker: leaves (L, ...) -> (L, W, ...), in global
  worker order."""
  l_count = _local_count(x)

  def one(v):
    allv = lax.all_gather(v, AXIS, axis=0, tiled=True)
    return jnp.broadcast_to(allv[None], (l_count,) + allv.shape)

  return _as_varying(jax.tree.map(one, x))


def worker_keys(key: jax.Array, num_local: int) -> jax.Array:
  """(L, 2) per-worker PRNG keys: fold_in(key, global worker index)."""
  return jax.vmap(lambda i: jax.random.fold_in(key, i))(worker_index(num_local))
