"""coltrain: co-located deep-learning training and inference in JAX.

Sub-packages:
  coltrain.numerics  block floating point / MX formats, quantizers, HBFP dot products.
  coltrain.data      TFDS data sources (incl. the embedded MNIST-5k) fed through grain.
  coltrain.models    flax models (MLP, LeNet, ResNet-20).
  coltrain.train     train state, pure train step, checkpointing, the training loop.
  coltrain.serve     co-located serving: KServe v2 front end, device schedulers.
  coltrain.cpus      CPU lists and the device/host core split on CPU-only machines.
"""

__version__ = "0.1.0"
