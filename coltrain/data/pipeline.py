"""grain input pipelines over TFDS data sources.

Training batches are a pure function of (seed, step): the train split is shuffled with a
fresh permutation every epoch (`shuffle(seed).repeat()`), cut into consecutive global
batches of `global_batch_size` examples, and JAX process `p` of `P` reads only rows
`[p*b, (p+1)*b)` of every global batch (b = global_batch_size / P). So the global batch
at a step is the same whatever the process count, and resuming at step `s` needs no
iterator state: the pipeline simply starts at batch `s`.
"""

from __future__ import annotations

from typing import Any, Iterator

import grain
import numpy as np


def _example(ex: dict[str, Any]) -> dict[str, np.ndarray]:
  return {"image": np.asarray(ex["image"], np.uint8), "label": np.int32(ex["label"])}


def train_batches(source, *, global_batch_size: int, seed: int, start_step: int = 0,
                  process_index: int = 0, process_count: int = 1,
                  num_threads: int = 2, prefetch: int = 8) -> Iterator[dict[str, np.ndarray]]:
  """Infinite iterator of this process's part of each global training batch.

  Yields {'image': uint8 (b, H, W, C), 'label': int32 (b,)} for steps start_step, ...
  """
  if global_batch_size % process_count:
    raise ValueError(f"batch_size {global_batch_size} is not divisible by the "
                     f"{process_count} JAX processes")
  local = global_batch_size // process_count
  ds = (grain.MapDataset.source(source)
        .shuffle(seed=seed)
        .repeat(None)
        .map(_example)
        .batch(local, drop_remainder=True))
  # Micro-batch s*P + p holds global rows s*B + p*b ... s*B + (p+1)*b - 1.
  ds = ds[process_index::process_count]
  ds = ds[start_step:]
  return iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=num_threads,
                                                   prefetch_buffer_size=prefetch)))


def load_split(source) -> dict[str, np.ndarray]:
  """Every example of `source`, decoded once: {'image': uint8 (n, H, W, C), 'label':
  int32 (n,)} (for splits small enough to hold in memory)."""
  examples = [_example(source[i]) for i in range(len(source))]
  return {"image": np.stack([e["image"] for e in examples]),
          "label": np.array([e["label"] for e in examples], np.int32)}


def train_batches_in_memory(arrays: dict[str, np.ndarray], *, global_batch_size: int,
                            seed: int, start_step: int = 0
                            ) -> Iterator[dict[str, np.ndarray]]:
  """Exactly `train_batches`' global batches (one process) gathered from `arrays`
  (`load_split`), with the same grain shuffle applied to row indices: a batch costs
  index arithmetic and one gather instead of decoding each example again."""
  n = len(arrays["label"])
  rows = (grain.MapDataset.range(n).shuffle(seed=seed).repeat(None)
          .batch(global_batch_size, drop_remainder=True))
  step = start_step
  while True:
    index = rows[step]
    yield {k: v[index] for k, v in arrays.items()}
    step += 1


def eval_batches(source, *, batch_size: int, process_index: int = 0,
                 process_count: int = 1) -> Iterator[dict[str, np.ndarray]]:
  """One pass over the whole split, in order, as fixed-size padded batches.

  Every batch has `batch_size` rows per process plus a float32 `mask` (1 = real example,
  0 = padding) so that every example is counted exactly once across processes.
  """
  n = len(source)
  global_batch = batch_size * process_count
  for start in range(0, n, global_batch):
    lo = start + process_index * batch_size
    idx = [i for i in range(lo, lo + batch_size) if i < n]
    rows = [_example(source[i]) for i in idx]
    mask = np.zeros((batch_size,), np.float32)
    mask[:len(rows)] = 1.0
    if rows:
      image = np.stack([r["image"] for r in rows])
      label = np.array([r["label"] for r in rows], np.int32)
    else:
      shape = np.asarray(source[0]["image"]).shape
      image = np.zeros((0,) + shape, np.uint8)
      label = np.zeros((0,), np.int32)
    pad = batch_size - len(rows)
    if pad:
      image = np.concatenate([image, np.zeros((pad,) + image.shape[1:], np.uint8)])
      label = np.concatenate([label, np.zeros((pad,), np.int32)])
    yield {"image": image, "label": label, "mask": mask}
