"""Data: TFDS data sources (incl. the embedded MNIST-5k) and grain pipelines."""

from coltrain.data.pipeline import (eval_batches, load_split, train_batches,
                                     train_batches_in_memory)
from coltrain.data.sources import DatasetNotPrepared, DatasetSpec, open_dataset

__all__ = ["open_dataset", "DatasetSpec", "DatasetNotPrepared", "train_batches",
           "train_batches_in_memory", "load_split", "eval_batches"]
