"""The one metrics writer: JSON lines plus TensorBoard event files (no TensorFlow)."""

from __future__ import annotations

import json
import os
from typing import Mapping

import numpy as np


class MetricsWriter:
  """Appends `{"step": s, **scalars}` lines to `<workdir>/metrics.jsonl` and writes the
  same scalars to TensorBoard events in `<workdir>/tensorboard/`. Disabled (a no-op) on
  every process but the main one."""

  def __init__(self, workdir: str, enabled: bool = True):
    self.enabled = enabled
    self._jsonl = None
    self._tb = None
    if enabled:
      from tensorboardX import SummaryWriter  # imported lazily: heavy
      self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a", buffering=1)
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
