"""Chunked co-located training (coltrain.serve.trainer) is launch.train's training."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from coltrain.data import open_dataset, train_batches
from coltrain.models import get_model
from coltrain.serve.config import validate_serve, with_serve_defaults
from coltrain.serve.trainer import ChunkTrainer
from coltrain.train import (create_train_state, make_accumulate_step, make_optimizer,
                            make_train_step)
from coltrain.train.loop import resolve_numerics
from tests.conftest import small_config


def serve_cfg(**kw):
  c = with_serve_defaults(small_config(batch_size=16, steps=50))
  c.serve.micro_batch_size = 4
  c.serve.chunk_steps = 2
  c.serve.publish_every = 1
  for k, v in kw.items():
    node = c
    *path, last = k.split(".")
    for p in path:
      node = node[p]
    node[last] = v
  return validate_serve(c)


def make_trainer(c, tfds_dir, published):
  sources, spec = open_dataset(c.dataset, tfds_dir)
  model = get_model(c.model, spec.num_classes)
  numerics = resolve_numerics(c.numerics, model, (1,) + spec.image_shape)
  tr = ChunkTrainer(c, model, spec, sources["train"], numerics, jax.devices()[0],
                    published.append)
  return tr, sources, spec, model, numerics


def _bits(tree):
  return [(np.asarray(x).dtype, np.asarray(x).tobytes()) for x in jax.tree.leaves(tree)]


@pytest.mark.parametrize("policy", ["fp32", "hbfp8_16"])
def test_accumulate_step_equals_the_multisteps_step_bit_for_bit(tfds_dir, policy):
  """On a micro-batch that does not complete an optimizer step, the accumulate step
  gives exactly the state (optimizer state, counters, model state) and metrics of the
  whole MultiSteps step, and the weights come back unchanged, where the whole step adds
  a zero update to them: the same values, but a weight of -0.0 can become +0.0 (many
  are -0.0 in a block format's storage)."""
  c = serve_cfg(**{"numerics.policy": policy, "optimizer.name": "adam"})
  sources, spec = open_dataset(c.dataset, tfds_dir)
  model = get_model(c.model, spec.num_classes)
  numerics = resolve_numerics(c.numerics, model, (1,) + spec.image_shape)
  assert (numerics is None) == (policy == "fp32")
  inner, schedule = make_optimizer(c.optimizer, c.steps)
  k = 4
  tx = optax.MultiSteps(inner, every_k_schedule=k)
  state = create_train_state(model, tx, c.seed, (1,) + spec.image_shape)
  if numerics is not None:
    state = state.replace(params=numerics.store(state.params, 0))
  full = jax.jit(make_train_step(model, tx, schedule, spec, numerics))
  lean = jax.jit(make_accumulate_step(model, schedule, spec, numerics))
  batches = train_batches(sources["train"], global_batch_size=4, seed=c.seed)
  for micro in range(2 * k):
    batch = next(batches)
    a, ma = full(state, batch)
    if micro % k == k - 1:   # completes the optimizer step: the whole step runs
      state = a
      continue
    b, mb = lean(state, batch)
    assert _bits(a.replace(params={})) == _bits(b.replace(params={})), micro
    assert _bits(ma) == _bits(mb)
    assert _bits(b.params) == _bits(state.params)
    for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(state.params)):
      x, y = np.asarray(x), np.asarray(y)   # the whole step adds a zero update:
      np.testing.assert_array_equal(x, y)   # equal values, and where the bits differ
      assert (x[x.view(np.uint32) != y.view(np.uint32)] == 0).all()   # only 0's sign
    state = b
  assert int(state.opt_state.gradient_step) == 2 and int(state.step) == 2 * k
  assert int(state.opt_state.mini_step) == 0
  start = create_train_state(model, tx, c.seed, (1,) + spec.image_shape)
  moved = max(float(jnp.abs(x - y).max()) for x, y in zip(
      jax.tree.leaves(state.params), jax.tree.leaves(start.params)))
  assert moved > 1e-4   # the two optimizer steps really changed the weights
  with pytest.raises(TypeError, match="MultiSteps"):
    make_accumulate_step(model, schedule, spec)(
        create_train_state(model, inner, c.seed, (1,) + spec.image_shape), batch)


def test_accumulated_micro_batches_equal_launch_train_steps(tfds_dir):
  c = serve_cfg()
  published = []
  tr, sources, spec, model, _ = make_trainer(c, tfds_dir, published)
  assert tr.accumulate == 4
  while tr.opt_steps < 3:
    assert tr.run_chunk() == 8      # 2 micro-batches of 4
  assert tr.samples == 3 * 16 and tr.micro_steps == 12
  # every optimizer step's weights are published once the next chunk, computed with
  # them, gave finite losses
  assert [w.version for w in published] == [1, 2]
  tr.run_chunk()                    # half of step 4: the weights do not change yet
  assert [w.version for w in published] == [1, 2, 3]

  tx, schedule = make_optimizer(c.optimizer, c.steps)
  state = create_train_state(model, tx, c.seed, (1,) + spec.image_shape)
  step = jax.jit(make_train_step(model, tx, schedule, spec))
  batches = train_batches(sources["train"], global_batch_size=c.batch_size, seed=c.seed)
  for _ in range(3):
    state, _ = step(state, next(batches))
  ours = jax.tree.leaves(tr.state.params)
  ref = jax.tree.leaves(state.params)
  moved = sum(float(np.abs(np.asarray(a) - np.asarray(b)).max()) for a, b in zip(
      ref, jax.tree.leaves(create_train_state(model, tx, c.seed,
                                              (1,) + spec.image_shape).params)))
  assert moved > 1e-3   # the steps really changed the weights
  for a, b in zip(ours, ref):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-4, atol=2e-5)
  v3 = published[-1]
  for a, b in zip(jax.tree.leaves(v3.params), ours):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  tr.run_chunk()   # step 4 completes (the train state is donated): v3 is unchanged
  tr.run_chunk()
  assert published[-1].version == 4
  for a, b in zip(jax.tree.leaves(v3.params), ref):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-4, atol=2e-5)


def test_training_stops_at_the_configured_steps(tfds_dir):
  c = serve_cfg(steps=2, **{"optimizer.warmup_steps": 1})
  published = []
  tr, *_ = make_trainer(c, tfds_dir, published)
  chunks = 0
  while tr.active:
    tr.run_chunk()
    chunks += 1
    assert chunks < 100
  assert tr.finished and tr.opt_steps == 2 and tr.run_chunk() == 0
  assert published[-1].version == 2


def test_a_diverging_run_fails_cleanly_and_never_publishes_bad_weights(tfds_dir):
  c = serve_cfg(**{"optimizer.learning_rate": 1e30, "optimizer.schedule": "constant"})
  published = []
  tr, *_ = make_trainer(c, tfds_dir, published)
  for _ in range(200):
    if tr.failure:
      break
    tr.run_chunk()
  assert tr.failure is not None and "non-finite" in tr.failure
  assert not tr.active and tr.run_chunk() == 0
  assert f"version {tr.published_version}" in tr.failure
  for w in published:
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(w.params))


def test_precision_policies_train_and_publish_storage_format_weights(tfds_dir):
  c = serve_cfg(**{"numerics.policy": "hbfp8_16"})
  published = []
  tr, _, _, _, numerics = make_trainer(c, tfds_dir, published)
  while tr.opt_steps < 2:
    tr.run_chunk()
  assert tr.failure is None and np.isfinite(tr.last_loss)
  w = published[-1]
  stored = numerics.store(w.params, w.phase)
  for a, b in zip(jax.tree.leaves(stored), jax.tree.leaves(w.params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_warmup_leaves_the_state_and_data_untouched(tfds_dir):
  c = serve_cfg()
  tr, *_ = make_trainer(c, tfds_dir, [])
  before = [np.asarray(x).copy() for x in jax.tree.leaves(tr.state.params)]
  times = tr.warmup(3)
  assert len(times) == 3 and all(t > 0 for t in times)
  assert tr.micro_steps == 0 and int(tr.state.step) == 0
  for a, b in zip(before, jax.tree.leaves(tr.state.params)):
    np.testing.assert_array_equal(a, np.asarray(b))


def test_input_is_read_ahead_and_a_failed_input_pipeline_surfaces(tfds_dir):
  c = serve_cfg()
  tr, *_ = make_trainer(c, tfds_dir, [])
  assert tr._fetcher.is_alive()
  tr.run_chunk()                        # 2 micro-batches of 4 out of the first global batch
  tr.close()
  assert not tr._fetcher.is_alive()     # close() stops the input thread
  while not tr._ahead.empty():
    tr._ahead.get()
  tr._ahead.put(OSError("disk gone"))   # what the input thread hands over when it fails
  with pytest.raises(RuntimeError, match="input pipeline failed: disk gone"):
    for _ in range(4):                  # the next global batch is needed within 2 chunks
      tr.run_chunk()


def test_a_chunk_never_waits_for_input(tfds_dir):
  c = serve_cfg()                       # 4 micro-batches per global batch, 2 per chunk
  tr, *_ = make_trainer(c, tfds_dir, [])
  tr.close()                            # the input thread reads nothing more
  while not tr._ahead.empty():
    tr._ahead.get()
  assert tr.input_ready()               # the current global batch is in hand
  assert tr.run_chunk() == 8 and tr.run_chunk() == 8
  assert not tr.input_ready()           # it is used up and nothing was read ahead
  steps = tr.micro_steps
  assert tr.run_chunk() == 0 and tr.micro_steps == steps   # returns at once, trains nothing
  assert tr.failure is None
  tr._ahead.put(next(iter(tr._batches)))
  assert tr.input_ready() and tr.run_chunk() == 8
