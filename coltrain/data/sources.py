"""Opening TFDS datasets as random-access data sources, without TensorFlow.

`open_dataset(name, data_dir)` returns the `train`/`test` sources of a TFDS dataset read
with `tfds.data_source` (array_record), plus a `DatasetSpec` describing it. The embedded
`mnist5k` dataset is prepared locally on first use; any other TFDS name must already be
prepared in the TFDS data dir (nothing is downloaded), otherwise `DatasetNotPrepared`
explains how to prepare it.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Mapping

import tensorflow_datasets as tfds

from coltrain.data import mnist5k as _mnist5k  # registers the `mnist5k` builder

EMBEDDED = ("mnist5k",)

# Per-channel normalization (mean, std) in [0, 1] pixel units; others use (0.5, 0.5).
_NORMALIZATION = {
    "mnist5k": ((0.1307,), (0.3081,)),
    "mnist": ((0.1307,), (0.3081,)),
    "fashion_mnist": ((0.2860,), (0.3530,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}


class DatasetNotPrepared(RuntimeError):
  """A named TFDS dataset is not in the data dir and coltrain will not download it."""


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
  """What a model and the input pipeline need to know about a dataset."""
  name: str
  num_classes: int
  image_shape: tuple[int, ...]  # (H, W, C), uint8 pixels
  num_train: int
  num_test: int
  mean: tuple[float, ...]
  std: tuple[float, ...]


def default_data_dir() -> str:
  return os.environ.get("TFDS_DATA_DIR") or os.path.expanduser("~/tensorflow_datasets")


def _prepare_help(name: str, data_dir: str) -> str:
  return (
      f"TFDS dataset '{name}' is not prepared in data dir '{data_dir}', and coltrain never "
      f"downloads data at run time. Prepare it once on a machine with network access, e.g.\n"
      f"    tfds build {name} --data_dir {data_dir}   (or tfds.builder('{name}', "
      f"data_dir='{data_dir}').download_and_prepare() with file_format='array_record')\n"
      f"then copy '{data_dir}/{name}' here, or point --config.data_dir at it. "
      f"The embedded dataset that needs nothing is: {', '.join(EMBEDDED)}.")


def open_dataset(name: str, data_dir: str | None = None) -> tuple[Mapping[str, Any], DatasetSpec]:
  """Returns ({'train': source, 'test': source}, spec) for TFDS dataset `name`.

  Sources support `len()` and random access `source[i] -> {'image': uint8 (H, W, C),
  'label': int}`.
  """
  data_dir = data_dir or default_data_dir()
  kwargs: dict[str, Any] = dict(data_dir=data_dir,
                                builder_kwargs={"file_format": "array_record"})
  if name not in EMBEDDED:
    kwargs["download"] = False
  try:
    train, test = tfds.data_source(name, split=["train", "test"], **kwargs)
    sources = {"train": train, "test": test}
  except tfds.core.registered.DatasetNotFoundError as e:
    raise DatasetNotPrepared(f"'{name}' is not a TFDS dataset name known here ({e}).") from e
  except Exception as e:  # tfds raises several types for "not prepared" (AssertionError, ...)
    if name in EMBEDDED:
      raise
    raise DatasetNotPrepared(_prepare_help(name, data_dir) + f"\n(TFDS said: {e})") from e
  features = sources["train"].dataset_info.features
  if "image" not in features or "label" not in features:
    raise ValueError(f"dataset '{name}' needs 'image' and 'label' features, "
                     f"it has {sorted(features.keys())}")
  image_shape = tuple(features["image"].shape)
  if len(image_shape) != 3 or None in image_shape:
    raise ValueError(f"dataset '{name}': images must have a fixed (H, W, C) shape, "
                     f"got {image_shape}")
  channels = image_shape[-1]
  mean, std = _NORMALIZATION.get(name, ((0.5,) * channels, (0.5,) * channels))
  spec = DatasetSpec(name=name, num_classes=int(features["label"].num_classes),
                     image_shape=image_shape, num_train=len(sources["train"]),
                     num_test=len(sources["test"]), mean=tuple(mean), std=tuple(std))
  return sources, spec
