"""The one metrics writer: JSON lines plus TensorBoard event files (no TensorFlow)."""

from __future__ import annotations

import json
import os
from typing import Mapping

import numpy as np


class MetricsWriter:
  """Appends `{"step": s, **scalars}` lines to `<workdir>/metrics.jsonl` and writes the
  same scalars to TensorBoard events in `<workdir>/tensorboard/`. Disabled (a no-op) on
  every process but the main one.

  `resume_step`: a run resumed from the checkpoint of that step first drops the lines
  of later steps (written before a crash, about to be trained and logged again), so
  metrics.jsonl holds every step once."""

  def __init__(self, workdir: str, enabled: bool = True, resume_step: int | None = None):
    self.enabled = enabled
    self._jsonl = None
    self._tb = None
    if enabled:
      from tensorboardX import SummaryWriter  # imported lazily: heavy
      path = os.path.join(workdir, "metrics.jsonl")
      if resume_step is not None and os.path.exists(path):
        _truncate_after(path, resume_step)
      self._jsonl = open(path, "a", buffering=1)
      self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

  def write(self, step: int, scalars: Mapping[str, float]) -> None:
    if not self.enabled:
      return
    clean = {k: float(np.asarray(v)) for k, v in scalars.items()}
    self._jsonl.write(json.dumps({"step": int(step), **clean}) + "\n")
    for k, v in clean.items():
      self._tb.add_scalar(k, v, int(step))

  def flush(self) -> None:
    if self.enabled:
      self._jsonl.flush()
      self._tb.flush()

  def close(self) -> None:
    if self.enabled:
      self._jsonl.close()
      self._tb.close()
      self.enabled = False


def _truncate_after(path: str, step: int) -> None:
  """Rewrites the JSONL file at `path` (atomically) without lines of steps > `step`
  (and without a torn last line)."""
  keep, dropped = [], False
  with open(path) as f:
    for line in f:
      try:
        if json.loads(line)["step"] <= step:
          keep.append(line if line.endswith("\n") else line + "\n")
          continue
      except (ValueError, KeyError, TypeError):
        pass
      dropped = True
  if dropped:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
      f.writelines(keep)
    os.replace(tmp, path)
