"""A LeNet-5-style CNN (conv-pool-conv-pool-dense-dense-dense) with ReLU and max pooling."""

import flax.linen as nn
import jax.numpy as jnp


class LeNet(nn.Module):
  """x (B, H, W, C) float32 -> logits (B, num_classes)."""
  num_classes: int
  features: tuple[int, int] = (32, 64)
  hidden: tuple[int, int] = (256, 128)

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
    del train
    x = nn.relu(nn.Conv(self.features[0], (5, 5), padding="SAME", name="conv0")(x))
    x = nn.max_pool(x, (2, 2), strides=(2, 2))
    x = nn.relu(nn.Conv(self.features[1], (5, 5), padding="VALID", name="conv1")(x))
    x = nn.max_pool(x, (2, 2), strides=(2, 2))
    x = x.reshape((x.shape[0], -1))
    x = nn.relu(nn.Dense(self.hidden[0], name="dense0")(x))
    x = nn.relu(nn.Dense(self.hidden[1], name="dense1")(x))
    return nn.Dense(self.num_classes, name="head")(x)
