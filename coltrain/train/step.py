"""The pure train and eval steps.

`train_step(state, batch) -> (state, metrics)` and `eval_step(state, batch) -> sums` are
pure functions of pytrees; the loop jits them. A batch is {'image': uint8 (B, H, W, C),
'label': int32 (B,)} (+ 'mask' float32 (B,) for evaluation); images are normalized
on device.
"""

from __future__ import annotations

from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from coltrain.data import DatasetSpec
from coltrain.train.state import TrainState

Metrics = dict[str, jax.Array]


def preprocess(images: jax.Array, spec: DatasetSpec) -> jax.Array:
  """uint8 pixels -> float32 normalized with the dataset's per-channel mean/std."""
  x = images.astype(jnp.float32) / 255.0
  return (x - jnp.asarray(spec.mean, jnp.float32)) / jnp.asarray(spec.std, jnp.float32)


def make_train_step(model: nn.Module, tx: optax.GradientTransformation,
                    schedule: optax.Schedule, spec: DatasetSpec
                    ) -> Callable[[TrainState, dict], tuple[TrainState, Metrics]]:
  """Builds `train_step(state, batch) -> (state, metrics)`.

  metrics: loss (mean cross-entropy), accuracy (fraction), learning_rate (the one used
  for this update), all float32 scalars.
  """

  def train_step(state: TrainState, batch: dict) -> tuple[TrainState, Metrics]:
    x = preprocess(batch["image"], spec)
    labels = batch["label"]
    step_rng = jax.random.fold_in(state.rng, state.step)
    mutable = list(state.model_state.keys())

    def loss_fn(params):
      variables = {"params": params, **state.model_state}
      if mutable:
        logits, new_model_state = model.apply(variables, x, train=True, mutable=mutable,
                                              rngs={"dropout": step_rng})
      else:
        logits = model.apply(variables, x, train=True, rngs={"dropout": step_rng})
        new_model_state = state.model_state
      loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
      return loss, (logits, new_model_state)

    (loss, (logits, new_model_state)), grads = jax.value_and_grad(
        loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {
        "loss": loss,
        "accuracy": jnp.mean(jnp.argmax(logits, -1) == labels).astype(jnp.float32),
        "learning_rate": jnp.asarray(schedule(state.step), jnp.float32),
    }
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                              model_state=dict(new_model_state))
    return new_state, metrics

  return train_step


def make_eval_step(model: nn.Module, spec: DatasetSpec
                   ) -> Callable[[TrainState, dict], Metrics]:
  """Builds `eval_step(state, batch) -> {'loss_sum', 'correct', 'count'}` (float32 sums
  over the batch's real, unmasked examples) so that batches add up exactly."""

  def eval_step(state: TrainState, batch: dict) -> Metrics:
    x = preprocess(batch["image"], spec)
    logits = model.apply({"params": state.params, **state.model_state}, x, train=False)
    mask = batch["mask"]
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])
    correct = (jnp.argmax(logits, -1) == batch["label"]).astype(jnp.float32)
    return {"loss_sum": jnp.sum(loss * mask), "correct": jnp.sum(correct * mask),
            "count": jnp.sum(mask)}

  return eval_step
