"""orbax checkpoints of the train state.

Checkpoints live in `<workdir>/checkpoints/<step>/`. orbax writes each one into a
temporary directory and renames it into place only once complete, so a crash mid-write
leaves either the previous checkpoints or a temporary directory that is ignored (and
cleaned up) on the next start — never a checkpoint that loads wrong.

Multi-process runs write one checkpoint together (orbax: each process writes the shards
it holds, process 0 commits); `restore` reads it into the shardings of the state it is
given, so a run resumes on the same or a different number of processes and devices.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp


class Checkpointer:
  """Saves and restores a train-state pytree by step number."""

  def __init__(self, directory: str, keep: int = 2):
    self.directory = os.path.abspath(directory)
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                             enable_async_checkpointing=False,
                                             cleanup_tmp_directories=True))

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def save(self, step: int, state: Any) -> None:
    """Writes `state` as checkpoint `step` (atomically); no-op if it already exists."""
    if step in self._manager.all_steps():
      return
    self._manager.save(step, args=ocp.args.StandardSave(state), force=True)
    self._manager.wait_until_finished()

  def restore(self, like: Any, step: int | None = None) -> Any:
    """Restores checkpoint `step` (default: latest) into the structure/shardings of `like`."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {self.directory}")
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
    return self._manager.restore(step, args=ocp.args.StandardRestore(abstract))

  def read(self, step: int | None = None) -> Any:
    """Checkpoint `step` (default: latest) as a dict of numpy arrays, whatever topology
    wrote it (for inspection and tests; training resumes with `restore`)."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {self.directory}")
    path = os.path.join(self.directory, str(step), "default")
    reader = ocp.StandardCheckpointer()
    tree = reader.metadata(path).item_metadata.tree
    device = jax.local_devices()[0]
    abstract = jax.tree.map(lambda m: jax.ShapeDtypeStruct(
        m.shape, m.dtype, sharding=jax.sharding.SingleDeviceSharding(device)), tree)
    out = jax.tree.map(lambda x: np.asarray(x), reader.restore(path, abstract))
    reader.close()
    return out

  def close(self) -> None:
    self._manager.close()
