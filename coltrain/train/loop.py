"""`train_and_evaluate`: the one training loop, driven by a validated config.

Writes into `workdir`:
  config.json        the resolved config (a rerun must match it to resume)
  metrics.jsonl      train metrics every `log_every` steps, test metrics at evaluations
  tensorboard/       the same scalars as TensorBoard events
  checkpoints/<s>/   orbax checkpoints of the whole train state
  summary.json       the final results (see `train_and_evaluate`)
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from typing import Any, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tqdm

from jax.sharding import Mesh, NamedSharding, PartitionSpec

from coltrain.comm import workers as wk
from coltrain.comm.algorithms import make_algorithm
from coltrain.comm.stacked import init_workers, split_batch
from coltrain.comm.workers import make_mesh
from coltrain.config import ConfigError, validate
from coltrain.data import eval_batches, open_dataset, train_batches
from coltrain.models import get_model
from coltrain.numerics.policy import ResolvedPolicy, make_policy
from coltrain.train.checkpoint import Checkpointer
from coltrain.train.fingerprint import params_fingerprint
from coltrain.train.metrics_writer import MetricsWriter
from coltrain.train.optim import make_optimizer
from coltrain.train.state import TrainState, create_train_state
from coltrain.train.step import make_eval_step, make_train_step, make_worker_train_step

# Keys that may change between an interrupted run and its resumption.
# (`steps` is not among them: it shapes the learning-rate schedule.)
RESUMABLE_CHANGES = ("eval_every", "checkpoint_every", "keep_checkpoints",
                     "log_every", "eval_batch_size", "data_dir")


def _flat(d: dict, prefix: str = "") -> dict:
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_flat(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def _check_or_write_config(workdir: str, config: ml_collections.ConfigDict,
                           write: bool) -> None:
  path = os.path.join(workdir, "config.json")
  current = json.loads(config.to_json_best_effort())
  if os.path.exists(path):
    with open(path) as f:
      saved = json.load(f)
    old, new = _flat(saved), _flat(current)
    diffs = sorted(k for k in set(old) | set(new)
                   if k not in RESUMABLE_CHANGES and old.get(k) != new.get(k))
    if diffs:
      raise ConfigError(
          f"workdir '{workdir}' holds a run with a different config "
          f"({', '.join(f'{k}: {old.get(k)!r} -> {new.get(k)!r}' for k in diffs)}); "
          f"use a new --workdir, or the same config to resume it.")
  if write:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
      json.dump(current, f, indent=2, sort_keys=True)
    os.replace(tmp, path)


def evaluate(eval_step, state: TrainState, source, batch_size: int) -> dict[str, float]:
  """Mean test loss and accuracy over the whole split (every example exactly once)."""
  totals = {"loss_sum": 0.0, "correct": 0.0, "count": 0.0}
  for batch in eval_batches(source, batch_size=batch_size,
                            process_index=jax.process_index(),
                            process_count=jax.process_count()):
    sums = jax.device_get(eval_step(state, batch))
    for k in totals:
      totals[k] += float(sums[k])
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    vals = multihost_utils.process_allgather(np.array([totals[k] for k in totals]))
    totals = dict(zip(totals, np.asarray(vals).sum(0).tolist()))
  n = max(totals["count"], 1.0)
  return {"test_loss": totals["loss_sum"] / n, "test_accuracy": totals["correct"] / n}


def resolve_numerics(numerics_cfg: ml_collections.ConfigDict, model,
                     input_shape: tuple[int, ...]) -> Optional[ResolvedPolicy]:
  """The precision policy bound to `model` (None for plain fp32), or ConfigError."""
  if numerics_cfg.policy == "fp32":
    return None
  try:
    policy = make_policy(numerics_cfg.policy, datapath=numerics_cfg.datapath,
                         backend=numerics_cfg.backend, hw_plugin=numerics_cfg.hw_plugin)
    return policy.resolve(model, jnp.zeros(input_shape, jnp.float32), train=False)
  except ValueError as e:
    raise ConfigError(f"numerics.policy {numerics_cfg.policy!r}: {e}") from e


def devices_for_workers(workers: int) -> int:
  """The most local devices (at most all of them) over which `workers` split evenly."""
  n = jax.local_device_count()
  return max(d for d in range(1, n + 1) if workers % d == 0)


def worker_mesh(workers: int) -> Mesh:
  """The 1-D `workers` mesh for `workers` stacked workers over every JAX process.

  One process: the most local devices over which the workers split evenly. P processes:
  each process contributes the same number d of its local devices (the most with
  (W / P) % d == 0), ordered by process, so process p holds the contiguous block of
  workers p*W/P ... (p+1)*W/P - 1 -- exactly the workers whose examples its data
  pipeline reads (worker g takes rows g*B/W ... of the global batch).
  """
  nproc = jax.process_count()
  if nproc == 1:
    return make_mesh(num_devices=devices_for_workers(workers))
  if workers % nproc:
    raise ConfigError(f"'comm.workers' {workers} must be a multiple of the {nproc} JAX "
                      f"processes (each process runs W/P workers); e.g. "
                      f"--config.comm.workers={nproc * max(1, workers // nproc)}")
  per_process = workers // nproc
  by_process: dict[int, list] = {}
  for dev in jax.devices():
    by_process.setdefault(dev.process_index, []).append(dev)
  counts = {len(v) for v in by_process.values()}
  n_local = min(counts)
  d = max(k for k in range(1, n_local + 1) if per_process % k == 0)
  devices = [dev for p in sorted(by_process)
             for dev in sorted(by_process[p], key=lambda x: x.id)[:d]]
  return make_mesh(devices=devices)


def to_host(tree: Any) -> Any:
  """numpy copies of a pytree's arrays, also of arrays that span several processes
  (gathered from all of them: a collective, so every process must call it)."""

  def one(x):
    if not isinstance(x, jax.Array) or x.is_fully_addressable:
      return np.asarray(jax.device_get(x))
    if x.is_fully_replicated:
      return np.asarray(x.addressable_data(0))
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))

  return jax.tree.map(one, tree)


def worker_batch(local_batch: dict, workers: int, mesh: Mesh) -> dict:
  """This process's slice of the global batch -> (W, B/W, ...) arrays over `mesh`.

  One process: `split_batch`. P processes: the local rows (B/P of them, the slice the
  pipeline read) are this process's workers' shares, assembled into one global array
  with `jax.make_array_from_process_local_data` (no data crosses processes).
  """
  if jax.process_count() == 1:
    return split_batch(local_batch, workers, mesh)
  per_process = workers // jax.process_count()
  sharding = NamedSharding(mesh, PartitionSpec(wk.AXIS))

  def one(x):
    x = np.asarray(x)
    local = x.reshape((per_process, x.shape[0] // per_process) + x.shape[1:])
    return jax.make_array_from_process_local_data(sharding, local,
                                                  (workers,) + local.shape[1:])

  return jax.tree.map(one, local_batch)


def communication_summary(alg, stacked_params, steps: int, spectral_gap: float) -> dict:
  """bytes_sent_per_worker (whole run, mean over workers, exact payload bytes),
  consensus_distance (mean over workers of ||x_i - x_bar||^2 over all parameters),
  spectral_gap of the mixing matrix (1 for exact averaging)."""
  one = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape[1:], x.dtype), stacked_params)
  total = float(sum(np.mean(alg.bytes_per_step(s, one)) for s in range(steps)))
  leaves = [np.asarray(x, np.float64) for x in jax.tree.leaves(to_host(stacked_params))]
  w = leaves[0].shape[0]
  dist = sum(((x - x.mean(0)) ** 2).reshape(w, -1).sum(1) for x in leaves).mean()
  return {"bytes_sent_per_worker": total, "consensus_distance": float(dist),
          "spectral_gap": spectral_gap, "workers": w}


def _write_json_atomic(path: str, obj: Any) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=2, sort_keys=True)
  os.replace(tmp, path)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       stop: threading.Event | None = None) -> dict[str, Any]:
  """Trains and evaluates per `config`, resuming from `workdir` if it holds checkpoints.

  `stop`: when set (e.g. by a SIGINT/SIGTERM handler), the loop saves a checkpoint after
  the current step and returns early with `summary["interrupted"] = True`.

  Returns the summary (also written to `workdir/summary.json` when the run completes):
  test_accuracy (0..1), test_loss, steps, wall_seconds (this invocation),
  train_steps_per_second (steady state: compile, evaluation and checkpoint time
  excluded), params_fingerprint (see `params_fingerprint`), resumed_from_step,
  num_params, interrupted.
  """
  t_begin = time.perf_counter()
  config = validate(config)
  is_main = jax.process_index() == 0
  if jax.process_count() > 1:  # process 0 prepares the dataset (first use) alone
    from jax.experimental import multihost_utils
    if is_main:
      open_dataset(config.dataset, config.data_dir or None)
    multihost_utils.sync_global_devices("coltrain: dataset ready")
  sources, spec = open_dataset(config.dataset, config.data_dir or None)
  model = get_model(config.model, spec.num_classes)
  tx, schedule = make_optimizer(config.optimizer, config.steps)
  numerics = resolve_numerics(config.numerics, model, (1,) + spec.image_shape)
  # Only a config that passed every check (incl. the policy against the model) is recorded.
  os.makedirs(workdir, exist_ok=True)
  _check_or_write_config(workdir, config, write=is_main)
  state = create_train_state(model, tx, config.seed, (1,) + spec.image_shape)
  if numerics is not None:  # weights live in the storage format from the start
    state = state.replace(params=numerics.store(state.params, 0))
  num_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.params))

  workers = config.comm.workers
  multiprocess = jax.process_count() > 1
  alg = mesh = None
  if multiprocess and workers == 1:
    raise ConfigError(f"{jax.process_count()} JAX processes need several workers: set "
                      f"--config.comm.workers to a multiple of {jax.process_count()}")
  if workers > 1:
    alg = make_algorithm(config.comm, tx=tx, track_consensus=False, seed=config.seed,
                         backend=config.numerics.backend, hw_plugin=config.numerics.hw_plugin)
    mesh = worker_mesh(workers)
    params, opt_state, model_state, comm_state = init_workers(
        state.params, state.model_state, tx, alg, mesh)
    state = state.replace(params=params, opt_state=opt_state, model_state=model_state,
                          comm_state=comm_state)
    if multiprocess:  # every array of the state is global: shared scalars replicated
      state = state.replace(step=wk.replicate(state.step, mesh),
                            rng=wk.replicate(state.rng, mesh))

  ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), keep=config.keep_checkpoints)
  resumed_from = ckpt.latest_step()
  if resumed_from is not None:  # into this run's shardings, whatever the process count
    state = ckpt.restore(state)
  start = int(state.step)
  summary_path = os.path.join(workdir, "summary.json")
  if start >= config.steps and os.path.exists(summary_path):
    ckpt.close()
    with open(summary_path) as f:  # the run is already complete: report it again
      return json.load(f)
  spectral_gap = None
  if alg is not None:
    spectral_gap = alg.topology.spectral_gap() if alg.topology is not None else 1.0
  if is_main:
    what = f"resuming from step {start}" if resumed_from is not None else "starting"
    print(f"coltrain: {config.model} on {spec.name} ({spec.num_train} train / "
          f"{spec.num_test} test), {num_params:,} params; {what}; workdir {workdir}",
          file=sys.stderr, flush=True)
    if alg is not None:
      where = (f" in {jax.process_count()} processes" if multiprocess else "")
      print(f"coltrain: {workers} workers on {mesh.devices.size} device(s){where}, "
            f"{config.comm.algorithm}"
            + (f" over {config.comm.topology}" if alg.topology is not None else "")
            + f", compressor {config.comm.compressor}; mixing spectral gap "
            f"{spectral_gap:.4f}", file=sys.stderr, flush=True)

  steps_by_phase: dict[int, Any] = {}  # one jitted train/eval step per policy phase
  evals_by_phase: dict[int, Any] = {}

  def phase_at(s: int) -> int:
    return numerics.phase_at(s, config.steps) if numerics is not None else 0

  def train_step(state, batch):
    phase = phase_at(int(step))
    if phase not in steps_by_phase:
      if alg is None:
        fn = make_train_step(model, tx, schedule, spec, numerics, phase)
      else:
        fn = make_worker_train_step(model, alg, mesh, schedule, spec, numerics, phase)
      steps_by_phase[phase] = jax.jit(fn, donate_argnums=0)
    if alg is not None:
      batch = worker_batch(batch, workers, mesh)
    return steps_by_phase[phase](state, batch)

  average_workers = jax.jit(lambda st: st.replace(
      params=jax.tree.map(lambda x: x.mean(0), st.params), opt_state=None,
      model_state=jax.tree.map(lambda x: x.mean(0), st.model_state), comm_state={}))

  def eval_step(state, batch):
    phase = phase_at(max(int(step) - 1, 0))  # the phase that produced these weights
    if phase not in evals_by_phase:
      evals_by_phase[phase] = jax.jit(make_eval_step(model, spec, numerics, phase))
    return evals_by_phase[phase](state, batch)

  def evaluate_state(state):
    """Test metrics of the model (with several workers: of the workers' average).
    With several processes the average comes to every host and each process evaluates
    its slice of the test set on its own devices (sums combined across processes)."""
    if alg is not None:
      state = average_workers(state)
      if multiprocess:
        state = to_host(state)
    return evaluate(eval_step, state, sources["test"], config.eval_batch_size)
  writer = MetricsWriter(workdir, enabled=is_main, resume_step=start)
  batches = train_batches(sources["train"], global_batch_size=config.batch_size,
                          seed=config.seed, start_step=start,
                          process_index=jax.process_index(),
                          process_count=jax.process_count())
  bar = tqdm.tqdm(total=config.steps, initial=start, disable=not is_main, file=sys.stderr,
                  unit="step", mininterval=0.5, dynamic_ncols=True, desc="train")

  train_seconds, timed_steps = 0.0, 0
  t_mark, mark_step = None, start   # steady-state timing window (after the first step)
  window: list[dict] = []
  interrupted = False
  step = start
  eval_result: dict[str, float] = {}

  def close_window():
    """Syncs and books the time since the last mark as training time."""
    nonlocal train_seconds, timed_steps, t_mark, mark_step
    jax.block_until_ready(state.step)
    now = time.perf_counter()
    if t_mark is not None:
      train_seconds += now - t_mark
      timed_steps += step - mark_step
    return now

  try:
    while step < config.steps:
      batch = next(batches)
      state, metrics = train_step(state, batch)
      step += 1
      window.append(metrics)
      bar.update(1)
      if t_mark is None:  # first step of this invocation: compile; time from here on
        jax.block_until_ready(state.step)
        t_mark, mark_step = time.perf_counter(), step
      log_now = config.log_every and step % config.log_every == 0
      eval_now = config.eval_every and step % config.eval_every == 0 and step < config.steps
      ckpt_now = config.checkpoint_every and step % config.checkpoint_every == 0
      stop_now = stop is not None and stop.is_set()
      if multiprocess:
        # JAX's preemption sync: a SIGTERM to any process (launch.train turns SIGINT into
        # one) makes every process stop and checkpoint after the same step.
        from jax.experimental import multihost_utils
        stop_now = multihost_utils.reached_preemption_sync_point(step)
      if not (log_now or eval_now or ckpt_now or stop_now or step == config.steps):
        continue
      now = close_window()
      if log_now and window:
        means = {k: float(np.mean([jax.device_get(m[k]) for m in window]))
                 for k in window[0]}
        means["steps_per_second"] = timed_steps / train_seconds if train_seconds else 0.0
        writer.write(step, means)
        bar.set_postfix(loss=f"{means['loss']:.4f}", acc=f"{means['accuracy']:.3f}")
        window = []
      if eval_now:
        eval_result = evaluate_state(state)
        writer.write(step, eval_result)
      if ckpt_now or stop_now:
        ckpt.save(step, state)
      if stop_now:
        interrupted = True
        break
      t_mark, mark_step = time.perf_counter(), step
      del now
  finally:
    bar.close()

  summary: dict[str, Any] = {
      "steps": step,
      "resumed_from_step": resumed_from if resumed_from is not None else 0,
      "interrupted": interrupted,
      "num_params": num_params,
      "train_steps_per_second": timed_steps / train_seconds if train_seconds else None,
  }
  if not interrupted:
    ckpt.save(step, state)
    eval_result = evaluate_state(state)
    writer.write(step, eval_result)
    summary.update(eval_result)
    final_params = to_host(state.params) if multiprocess else state.params
    summary["params_fingerprint"] = params_fingerprint(final_params)
    if alg is not None:
      summary.update(communication_summary(alg, final_params, step, spectral_gap))
  summary["wall_seconds"] = time.perf_counter() - t_begin
  writer.close()
  ckpt.close()
  if is_main:
    if interrupted:
      print(f"coltrain: stopped at step {step}; checkpoint saved. Rerun with the same "
            f"--workdir to resume.", file=sys.stderr, flush=True)
    else:
      _write_json_atomic(summary_path, summary)
  return summary
