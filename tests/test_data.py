"""Data sources and grain pipelines: the embedded MNIST-5k, determinism, sharding."""

import hashlib
import subprocess
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds

from coltrain.data import (DatasetNotPrepared, eval_batches, load_split, open_dataset,
                           train_batches, train_batches_in_memory)


def _take(it, n):
  return [next(it) for _ in range(n)]


def test_mnist5k_split_is_fixed_and_stratified(mnist5k):
  sources, spec = mnist5k
  assert (spec.num_train, spec.num_test, spec.num_classes) == (4000, 1000, 10)
  assert spec.image_shape == (28, 28, 1)
  for split, per_class in (("train", 400), ("test", 100)):
    labels = np.array([sources[split][i]["label"] for i in range(len(sources[split]))])
    np.testing.assert_array_equal(np.bincount(labels, minlength=10), [per_class] * 10)
  hashes = {split: {hashlib.sha1(np.asarray(sources[split][i]["image"]).tobytes()).hexdigest()
                    for i in range(len(sources[split]))} for split in ("train", "test")}
  assert not hashes["train"] & hashes["test"], "train and test overlap"
  img = np.asarray(sources["train"][0]["image"])
  assert img.dtype == np.uint8 and img.max() > 100  # real pixels, not zeros


def test_mnist5k_matches_the_csv(mnist5k):
  from coltrain.data.mnist5k import load_arrays
  sources, _ = mnist5k
  images, labels = load_arrays()["test"]
  for i in (0, 123, 999):
    np.testing.assert_array_equal(np.asarray(sources["test"][i]["image"]), images[i])
    assert sources["test"][i]["label"] == labels[i]


def test_shuffling_is_deterministic_from_seed(mnist5k):
  src = mnist5k[0]["train"]
  a = _take(train_batches(src, global_batch_size=16, seed=3), 5)
  b = _take(train_batches(src, global_batch_size=16, seed=3), 5)
  c = _take(train_batches(src, global_batch_size=16, seed=4), 5)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x["image"], y["image"])
    np.testing.assert_array_equal(x["label"], y["label"])
  assert any(not np.array_equal(x["image"], z["image"]) for x, z in zip(a, c))


def test_epochs_are_permutations_and_reshuffled(mnist5k):
  src = mnist5k[0]["train"]
  per_epoch = 4000 // 50
  batches = _take(train_batches(src, global_batch_size=50, seed=0), 2 * per_epoch)
  digest = lambda b: [hashlib.sha1(im.tobytes()).hexdigest() for im in b["image"]]
  e1 = [h for b in batches[:per_epoch] for h in digest(b)]
  e2 = [h for b in batches[per_epoch:] for h in digest(b)]
  all_images = {hashlib.sha1(np.asarray(src[i]["image"]).tobytes()).hexdigest()
                for i in range(len(src))}
  assert set(e1) == set(e2) == all_images  # each epoch visits every example
  assert e1 != e2  # in a new order


def test_resume_from_step_continues_the_same_stream(mnist5k):
  src = mnist5k[0]["train"]
  full = _take(train_batches(src, global_batch_size=32, seed=1), 10)
  resumed = _take(train_batches(src, global_batch_size=32, seed=1, start_step=6), 4)
  for x, y in zip(full[6:], resumed):
    np.testing.assert_array_equal(x["image"], y["image"])


def test_in_memory_batches_equal_the_pipeline_across_epochs(mnist5k):
  src = mnist5k[0]["train"]
  arrays = load_split(src)
  assert arrays["image"].shape == (len(src), 28, 28, 1) and arrays["image"].dtype == np.uint8
  steps = 2 * len(src) // 64 + 3                     # over two epoch boundaries
  for start in (0, 5):
    a = train_batches(src, global_batch_size=64, seed=3, start_step=start)
    b = train_batches_in_memory(arrays, global_batch_size=64, seed=3, start_step=start)
    for _ in range(steps):
      x, y = next(a), next(b)
      assert x["label"].dtype == y["label"].dtype
      np.testing.assert_array_equal(x["image"], y["image"])
      np.testing.assert_array_equal(x["label"], y["label"])


@pytest.mark.parametrize("processes", [2, 4])
def test_process_shards_tile_the_global_batch(mnist5k, processes):
  src = mnist5k[0]["train"]
  whole = _take(train_batches(src, global_batch_size=32, seed=2), 3)
  parts = [_take(train_batches(src, global_batch_size=32, seed=2, process_index=p,
                               process_count=processes), 3) for p in range(processes)]
  for step in range(3):
    joined = np.concatenate([parts[p][step]["image"] for p in range(processes)])
    np.testing.assert_array_equal(joined, whole[step]["image"])
    assert parts[0][step]["image"].shape[0] == 32 // processes


def test_batch_not_divisible_by_processes_is_an_error(mnist5k):
  with pytest.raises(ValueError, match="not divisible"):
    train_batches(mnist5k[0]["train"], global_batch_size=10, seed=0, process_count=4)


@pytest.mark.parametrize("processes", [1, 3])
def test_eval_batches_cover_every_example_once(mnist5k, processes):
  src = mnist5k[0]["test"]
  seen = []
  for p in range(processes):
    for b in eval_batches(src, batch_size=128, process_index=p, process_count=processes):
      assert b["image"].shape == (128, 28, 28, 1) and b["mask"].shape == (128,)
      seen += [int(l) for l, m in zip(b["label"], b["mask"]) if m]
  assert len(seen) == 1000
  np.testing.assert_array_equal(np.bincount(seen), [100] * 10)


def test_named_tfds_dataset_under_mock_data(tmp_path):
  """A named TFDS dataset (here 'mnist', mocked) goes through the same pipeline."""
  with tfds.testing.mock_data(num_examples=40, policy=tfds.testing.MockPolicy.USE_CODE):
    sources, spec = open_dataset("mnist", str(tmp_path))
    assert spec.num_classes == 10 and spec.image_shape == (28, 28, 1)
    batch = next(train_batches(sources["train"], global_batch_size=8, seed=0))
    assert batch["image"].shape == (8, 28, 28, 1) and batch["image"].dtype == np.uint8
    assert batch["label"].dtype == np.int32 and batch["label"].max() < 10
    evals = list(eval_batches(sources["test"], batch_size=16))
    assert sum(b["mask"].sum() for b in evals) == len(sources["test"])


def test_missing_named_dataset_says_how_to_prepare(tmp_path):
  with pytest.raises(DatasetNotPrepared, match=r"(?s)not prepared.*tfds build cifar10"):
    open_dataset("cifar10", str(tmp_path))


def test_no_tensorflow_is_imported(tfds_dir):
  code = ("import sys; from coltrain.data import open_dataset, train_batches; "
          f"s, _ = open_dataset('mnist5k', {tfds_dir!r}); "
          "next(train_batches(s['train'], global_batch_size=4, seed=0)); "
          "import coltrain.train; "
          "assert 'tensorflow' not in sys.modules, 'tensorflow was imported'")
  subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
