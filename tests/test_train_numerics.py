"""Training under precision policies: storage format, phases, exact datapath, errors."""

import jax
import numpy as np
import pytest

from coltrain.config import ConfigError
from coltrain.numerics import quantize
from coltrain.train import Checkpointer, TrainState, train_and_evaluate
from tests.conftest import small_config
from tests.test_train import StopAfter


def _restore_params(workdir):
  from coltrain.data import open_dataset
  from coltrain.models import get_model
  from coltrain.train import create_train_state, make_optimizer
  c = small_config()
  _, spec = open_dataset("mnist5k")
  model = get_model(c.model, spec.num_classes)
  tx, _ = make_optimizer(c.optimizer, c.steps)
  like = create_train_state(model, tx, 0, (1,) + spec.image_shape)
  return Checkpointer(f"{workdir}/checkpoints").restore(like).params


def test_hbfp8_16_trains_and_stores_weights_in_bfp16(tfds_dir, tmp_path):
  fp32 = train_and_evaluate(small_config(steps=60), str(tmp_path / "fp32"))
  hbfp = train_and_evaluate(small_config(steps=60, **{"numerics.policy": "hbfp8_16"}),
                            str(tmp_path / "hbfp"))
  assert hbfp["params_fingerprint"] != fp32["params_fingerprint"]
  assert hbfp["test_accuracy"] > 0.8 and abs(hbfp["test_accuracy"] - fp32["test_accuracy"]) < 0.05
  params = _restore_params(tmp_path / "hbfp")
  for path, w in jax.tree_util.tree_flatten_with_path(params)[0]:
    w = np.asarray(w)
    if w.ndim == 2:  # Dense kernels: stored as bfp16, blocks along in-features
      np.testing.assert_array_equal(np.asarray(quantize(w, "bfp16_b64", axis=0)), w,
                                    err_msg=jax.tree_util.keystr(path))
      assert not np.array_equal(np.asarray(quantize(w, "bfp8_b64", axis=0)), w)


def test_policy_run_is_deterministic_and_resumes_exactly(tfds_dir, tmp_path):
  """Stochastic rounding is keyed by (seed, step), and the booster's phase switch at 90%
  of the steps happens at the same step after a resume."""
  c = lambda: small_config(steps=20, **{"numerics.policy": "hbfp4_booster"})
  whole = train_and_evaluate(c(), str(tmp_path / "whole"))
  again = train_and_evaluate(c(), str(tmp_path / "again"))
  assert whole["params_fingerprint"] == again["params_fingerprint"]
  part = str(tmp_path / "part")
  train_and_evaluate(c(), part, stop=StopAfter(17))  # stop just before the switch (step 18)
  resumed = train_and_evaluate(c(), part)
  assert resumed["resumed_from_step"] == 17
  assert resumed["params_fingerprint"] == whole["params_fingerprint"]
  # Without the last phase (all fp32 after 90% instead of bfp6) the result differs.
  other = train_and_evaluate(small_config(steps=20, **{
      "numerics.policy": "@first,@last=bfp6;*=bfp4;@storage=bfp16|0.9:*=bfp8"}),
      str(tmp_path / "other"))
  assert other["params_fingerprint"] != whole["params_fingerprint"]


def test_exact_datapath_trains(tfds_dir, tmp_path, mnist5k):
  c = lambda datapath: small_config(steps=6, checkpoint_every=0, **{
      "numerics.policy": "hbfp8_16", "numerics.datapath": datapath})
  a = train_and_evaluate(c("exact"), str(tmp_path / "a"))
  b = train_and_evaluate(c("exact"), str(tmp_path / "b"))
  fake = train_and_evaluate(c("fake"), str(tmp_path / "fake"))
  assert np.isfinite(a["test_loss"])
  assert a["params_fingerprint"] == b["params_fingerprint"]
  # On data whose blocks share similar exponents every partial sum is exact in float32,
  # so the two datapaths often agree bit for bit; the accuracies must agree closely.
  assert abs(a["test_accuracy"] - fake["test_accuracy"]) < 0.02
  # The exact step really runs the ordered block accumulation (a scan over K blocks).
  from coltrain.data import train_batches
  from coltrain.models import get_model
  from coltrain.train import create_train_state, make_optimizer, make_train_step
  from coltrain.train.loop import resolve_numerics
  sources, spec = mnist5k
  model = get_model("mlp", 10)
  tx, schedule = make_optimizer(c("exact").optimizer, 6)
  state = create_train_state(model, tx, 0, (1, 28, 28, 1))
  batch = next(train_batches(sources["train"], global_batch_size=32, seed=0))
  for datapath in ("exact", "fake"):
    numerics = resolve_numerics(c(datapath).numerics, model, (1, 28, 28, 1))
    jaxpr = str(jax.make_jaxpr(make_train_step(model, tx, schedule, spec, numerics))(
        state, batch))
    assert ("scan" in jaxpr) == (datapath == "exact")


@pytest.mark.parametrize("policy,needle", [
    ("hbfp9000", "unknown policy preset"),
    ("*=bfp99", "bfp99"),
])
def test_bad_policy_fails_before_training(tfds_dir, tmp_path, policy, needle):
  with pytest.raises(ConfigError, match=needle):
    train_and_evaluate(small_config(**{"numerics.policy": policy}), str(tmp_path / "w"))
  assert not (tmp_path / "w").exists()


def test_policy_pattern_matching_no_layer_fails_before_training(tfds_dir, tmp_path):
  with pytest.raises(ConfigError, match="matches no GEMM layer.*dense0"):
    train_and_evaluate(small_config(**{"numerics.policy": "conv9=bfp8"}), str(tmp_path / "w"))
  assert not (tmp_path / "w").exists()
  # The corrected policy then runs in the same workdir.
  fixed = train_and_evaluate(small_config(steps=5, **{"numerics.policy": "dense0=bfp8"}),
                             str(tmp_path / "w"))
  assert fixed["steps"] == 5
