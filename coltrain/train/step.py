"""The pure train and eval steps.

`train_step(state, batch) -> (state, metrics)` and `eval_step(state, batch) -> sums` are
pure functions of pytrees; the loop jits them. A batch is {'image': uint8 (B, H, W, C),
'label': int32 (B,)} (+ 'mask' float32 (B,) for evaluation); images are normalized
on device.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from coltrain.comm.algorithms import Algorithm
from coltrain.comm.stacked import make_stacked_step
from coltrain.data import DatasetSpec
from coltrain.numerics.inject import numerics_context
from coltrain.numerics.policy import ResolvedPolicy
from coltrain.train.state import TrainState

Metrics = dict[str, jax.Array]


def preprocess(images: jax.Array, spec: DatasetSpec) -> jax.Array:
  """uint8 pixels -> float32 normalized with the dataset's per-channel mean/std."""
  x = images.astype(jnp.float32) / 255.0
  return (x - jnp.asarray(spec.mean, jnp.float32)) / jnp.asarray(spec.std, jnp.float32)


def _numerics(numerics: Optional[ResolvedPolicy], phase: int, key: jax.Array):
  """The context in which the model's GEMMs run under the precision policy's `phase`."""
  if numerics is None:
    return contextlib.nullcontext()
  return numerics_context(numerics, phase, key if numerics.needs_key(phase) else None)


def make_local_grad(model: nn.Module, spec: DatasetSpec,
                    numerics: Optional[ResolvedPolicy] = None, phase: int = 0):
  """Builds ONE worker's `local_grad(params, model_state, batch, key) ->
  (grads, new_model_state, {'loss', 'accuracy'})`, no communication.

  `key` is the step's key for this worker: split into the dropout key and the key of the
  precision policy's stochastic rounding. With `numerics` every Dense/Conv GEMM runs with
  the formats of policy phase `phase` (forward and both backward GEMMs).
  """

  def local_grad(params, model_state, batch, key):
    x = preprocess(batch["image"], spec)
    labels = batch["label"]
    dropout_rng, numerics_rng = jax.random.split(key)
    mutable = list(model_state.keys())

    def loss_fn(params):
      variables = {"params": params, **model_state}
      with _numerics(numerics, phase, numerics_rng):
        if mutable:
          logits, new_model_state = model.apply(variables, x, train=True, mutable=mutable,
                                                rngs={"dropout": dropout_rng})
        else:
          logits = model.apply(variables, x, train=True, rngs={"dropout": dropout_rng})
          new_model_state = model_state
      loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
      return loss, (logits, dict(new_model_state))

    (loss, (logits, new_model_state)), grads = jax.value_and_grad(
        loss_fn, has_aux=True)(params)
    accuracy = jnp.mean(jnp.argmax(logits, -1) == labels).astype(jnp.float32)
    return grads, new_model_state, {"loss": loss, "accuracy": accuracy}

  return local_grad


def _step_grads(local_grad, schedule: optax.Schedule, state: TrainState, batch: dict):
  """The gradient part of a single-worker step, shared by `make_train_step` and
  `make_accumulate_step` (which must derive the step's key and metrics identically):
  (grads, new model state, metrics with `learning_rate` = schedule(state.step))."""
  step_rng = jax.random.fold_in(state.rng, state.step)
  grads, model_state, metrics = local_grad(state.params, state.model_state, batch,
                                           step_rng)
  metrics["learning_rate"] = jnp.asarray(schedule(state.step), jnp.float32)
  return grads, model_state, metrics


def make_train_step(model: nn.Module, tx: optax.GradientTransformation,
                    schedule: optax.Schedule, spec: DatasetSpec,
                    numerics: Optional[ResolvedPolicy] = None, phase: int = 0
                    ) -> Callable[[TrainState, dict], tuple[TrainState, Metrics]]:
  """Builds the single-worker `train_step(state, batch) -> (state, metrics)`.

  With `numerics` (a precision policy resolved for `model`) the GEMMs run in policy phase
  `phase` (see `make_local_grad`; stochastic rounding keyed by the step) and the updated
  weights are re-quantized to the phase's storage format. The phase is static: the loop
  builds one step per phase.

  metrics: loss (mean cross-entropy), accuracy (fraction), learning_rate (the one used
  for this update), all float32 scalars.
  """
  local_grad = make_local_grad(model, spec, numerics, phase)

  def train_step(state: TrainState, batch: dict) -> tuple[TrainState, Metrics]:
    grads, model_state, metrics = _step_grads(local_grad, schedule, state, batch)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    if numerics is not None:
      params = numerics.store(params, phase)
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                              model_state=model_state)
    return new_state, metrics

  return train_step


def make_accumulate_step(model: nn.Module, schedule: optax.Schedule, spec: DatasetSpec,
                         numerics: Optional[ResolvedPolicy] = None, phase: int = 0
                         ) -> Callable[[TrainState, dict], tuple[TrainState, Metrics]]:
  """Builds `accumulate_step(state, batch) -> (state, metrics)`: a micro-batch step that
  does NOT complete an optimizer step, for a state whose optimizer is
  `optax.MultiSteps(tx, k)` (its defaults: the gradients' mean, no skip function) and
  whose `opt_state.mini_step` is below k - 1.

  It folds the micro-batch's gradient into `acc_grads` exactly as `MultiSteps` does
  (`acc + (grad - acc) / (mini_step + 1)`), counts `mini_step` and `step`, and updates
  the model state; the weights, the inner optimizer's state and `gradient_step` are
  returned as they came. `make_train_step` with the `MultiSteps` optimizer gives the
  same state and metrics on such a micro-batch, but it also computes the inner
  optimizer's update and the weights' update every micro-batch and then discards them
  (`where(emit, ...)`, `emit * update`), and XLA copies every buffer of the state: for
  LeNet with one sample per micro-batch that is a third of the step's time on a CPU
  core. Tested bit for bit against it, with and without a precision policy; the two
  differences are at the edges: a weight of -0.0 stays -0.0 (`MultiSteps` adds a zero
  update, which makes it +0.0; a block format stores many), and a non-finite gradient
  reaches the weights at the optimizer step, not at once.

  The last micro-batch of each optimizer step (mini_step == k - 1) must go through
  `make_train_step`. metrics: as `make_train_step`'s.
  """
  local_grad = make_local_grad(model, spec, numerics, phase)

  def accumulate_step(state: TrainState, batch: dict) -> tuple[TrainState, Metrics]:
    if not isinstance(state.opt_state, optax.MultiStepsState):
      raise TypeError("accumulate_step needs an optax.MultiSteps optimizer state, got "
                      f"{type(state.opt_state).__name__}")
    grads, model_state, metrics = _step_grads(local_grad, schedule, state, batch)
    opt = state.opt_state
    acc_grads = jax.tree.map(
        lambda g, acc: (acc + (g - acc) / (opt.mini_step + 1)).astype(acc.dtype),
        grads, opt.acc_grads)
    opt = opt._replace(mini_step=opt.mini_step + 1, acc_grads=acc_grads)
    new_state = state.replace(step=state.step + 1, opt_state=opt, model_state=model_state)
    return new_state, metrics

  return accumulate_step


def make_worker_train_step(model: nn.Module, alg: Algorithm, mesh: Mesh,
                           schedule: optax.Schedule, spec: DatasetSpec,
                           numerics: Optional[ResolvedPolicy] = None, phase: int = 0
                           ) -> Callable[[TrainState, dict], tuple[TrainState, Metrics]]:
  """Builds the multi-worker `train_step(state, batch) -> (state, metrics)`.

  `state.params/opt_state/model_state/comm_state` carry a leading worker axis (W, ...)
  sharded over `mesh`'s "workers" axis; `batch` leaves are (W, B/W, ...), worker g's
  share of the global batch. Inside one `shard_map`, each worker computes its local
  gradient (`make_local_grad`, key fold_in(step key, g)), then the communication
  algorithm `alg` exchanges and updates (collectives over the workers axis), then the
  weights are re-quantized to the policy's storage format.

  metrics: per-worker means of loss and accuracy, learning_rate, bytes_sent (mean bytes a
  worker sent this step).
  """
  stacked_step = make_stacked_step(make_local_grad(model, spec, numerics, phase), alg, mesh)

  def train_step(state: TrainState, batch: dict) -> tuple[TrainState, Metrics]:
    params, opt_state, model_state, comm_state, m = stacked_step(
        state.params, state.opt_state, state.model_state, state.comm_state, batch,
        state.step, state.rng)
    if numerics is not None:
      params = jax.vmap(lambda p: numerics.store(p, phase))(params)
    metrics = {"loss": jnp.mean(m["loss"]), "accuracy": jnp.mean(m["accuracy"]),
               "bytes_sent": jnp.mean(m["bytes_sent"]),
               "learning_rate": jnp.asarray(schedule(state.step), jnp.float32)}
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                              model_state=model_state, comm_state=comm_state)
    return new_state, metrics

  return train_step


def make_eval_step(model: nn.Module, spec: DatasetSpec,
                   numerics: Optional[ResolvedPolicy] = None, phase: int = 0
                   ) -> Callable[[TrainState, dict], Metrics]:
  """Builds `eval_step(state, batch) -> {'loss_sum', 'correct', 'count'}` (float32 sums
  over the batch's real, unmasked examples) so that batches add up exactly. With
  `numerics`, the forward GEMMs run as in training phase `phase`."""

  def eval_step(state: TrainState, batch: dict) -> Metrics:
    x = preprocess(batch["image"], spec)
    with _numerics(numerics, phase, jax.random.fold_in(state.rng, 0x7FFFFFFF)):
      logits = model.apply({"params": state.params, **state.model_state}, x, train=False)
    mask = batch["mask"]
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])
    correct = (jnp.argmax(logits, -1) == batch["label"]).astype(jnp.float32)
    return {"loss_sum": jnp.sum(loss * mask), "correct": jnp.sum(correct * mask),
            "count": jnp.sum(mask)}

  return eval_step


def make_predict_step(model: nn.Module, spec: DatasetSpec,
                      numerics: Optional[ResolvedPolicy] = None, phase: int = 0
                      ) -> Callable[[dict, dict, jax.Array], jax.Array]:
  """Builds `predict(params, model_state, images) -> logits` for serving: images are
  (B, H, W, C) pixels (uint8, or float32 in the same 0..255 units), normalized exactly as
  in training (`preprocess`); logits float32 (B, num_classes). With `numerics`, the
  forward GEMMs run as in training phase `phase` (as `make_eval_step`)."""

  def predict(params, model_state, images):
    x = preprocess(images, spec)
    with _numerics(numerics, phase, jax.random.PRNGKey(0x7FFFFFFF)):
      return model.apply({"params": params, **model_state}, x, train=False)

  return predict
