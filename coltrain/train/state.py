"""The train state: one pytree holding everything a run needs to continue exactly."""

from __future__ import annotations

from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax


@flax.struct.dataclass
class TrainState:
  """All fields are arrays or pytrees of arrays (checkpointable, jit-able).

  step:        int32 scalar, optimizer steps taken.
  params:      the model's `params` collection.
  opt_state:   the optax state of `tx`.
  model_state: the model's other variable collections (e.g. `batch_stats`); {} if none.
  rng:         uint32[2] base PRNG key; step `s` uses `fold_in(rng, s)`, so randomness
               depends only on (seed, step), never on how the run was interrupted.
  comm_state:  the communication algorithm's state (error-feedback memory, CHOCO public
               copies, ...); {} for single-worker training.

  With several workers (`comm.workers` > 1) params, opt_state, model_state and
  comm_state carry a leading worker axis (W, ...); step and rng are shared.
  """
  step: jax.Array
  params: Any
  opt_state: Any
  model_state: Any
  rng: jax.Array
  comm_state: Any = flax.struct.field(default_factory=dict)


def create_train_state(model: nn.Module, tx: optax.GradientTransformation, seed: int,
                       input_shape: tuple[int, ...]) -> TrainState:
  """Initializes the model on a zero batch of `input_shape` (1, H, W, C) and `tx`."""
  init_key, base_key = jax.random.split(jax.random.PRNGKey(seed))
  variables = model.init(init_key, jnp.zeros(input_shape, jnp.float32), train=False)
  variables = dict(variables)
  params = variables.pop("params")
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                    model_state=variables, rng=base_key)
