"""Starting a server from a `launch.train` run (`serve.init_from`).

`restore_train_state(path, ...)` reads the latest checkpoint of a `launch.train` run
(`path` is its workdir or that workdir's `checkpoints/` directory) into a single-worker
`TrainState` of `launch.train`'s own optimizer: `step` is the optimizer steps that run
took, the params are in the storage format the run left them in (precision policies).
`ChunkTrainer` continues from it (optimizer state, data position, step count), and the
server serves its weights with version = that step.

Every problem (no such directory, no checkpoint, a checkpoint of another model, dataset
or optimizer, a multi-worker run) raises `ConfigError` naming the path and the cause,
before the server starts.
"""

from __future__ import annotations

import os
from typing import Optional

import jax

from coltrain.config import ConfigError
from coltrain.train.checkpoint import Checkpointer
from coltrain.train.state import TrainState, create_train_state


def checkpoint_dir(path: str) -> str:
  """The checkpoints directory of `path`: `<path>/checkpoints` if it exists (a
  `launch.train` workdir), else `path` itself."""
  nested = os.path.join(path, "checkpoints")
  return nested if os.path.isdir(nested) else path


def restore_train_state(path: str, model, tx, seed: int, image_shape: tuple[int, ...],
                        numerics=None) -> TrainState:
  """The latest checkpoint under `path` as a `TrainState` of `tx` (see module
  docstring); raises `ConfigError` if there is none or it does not fit."""
  directory = checkpoint_dir(os.path.abspath(os.path.expanduser(path)))
  if not os.path.isdir(directory):
    raise ConfigError(f"invalid config:\n  - 'serve.init_from': no such directory: {path}")
  like = create_train_state(model, tx, seed, (1,) + tuple(image_shape))
  if numerics is not None:
    like = like.replace(params=numerics.store(like.params, 0))
  ckpt = Checkpointer(directory)
  try:
    step: Optional[int] = ckpt.latest_step()
    if step is None:
      raise ConfigError(f"invalid config:\n  - 'serve.init_from': no checkpoint in "
                        f"{directory} (a launch.train workdir or its checkpoints/)")
    try:
      state = ckpt.restore(like, step)
    except ConfigError:
      raise
    except Exception as e:   # orbax: structure or shape mismatch
      raise ConfigError(
          f"invalid config:\n  - 'serve.init_from': checkpoint {step} in {directory} does "
          f"not fit this config's model, dataset and optimizer (single worker): "
          f"{type(e).__name__}: {str(e).splitlines()[0][:300]}") from None
  finally:
    ckpt.close()
  got = int(jax.device_get(state.step))
  if got != step:
    raise ConfigError(f"invalid config:\n  - 'serve.init_from': checkpoint {step} in "
                      f"{directory} holds step {got}")
  return state
