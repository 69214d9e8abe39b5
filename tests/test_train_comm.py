"""Multi-worker training: accounting, checkpoint/resume with communication state,
device-count independence, and config errors."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from coltrain.config import ConfigError
from coltrain.train import train_and_evaluate
from tests.conftest import REPO, small_config
from tests.test_train import StopAfter

N_PARAMS = 535_818  # the MLP


def test_dpsgd_ring_bytes_and_consensus(tfds_dir, tmp_path):
  c = small_config(steps=30, **{"comm.workers": 4, "comm.algorithm": "dpsgd"})
  s = train_and_evaluate(c, str(tmp_path / "w"))
  assert s["workers"] == 4
  # Uncompressed gossip on a ring: each worker sends its float32 model to 2 neighbours.
  assert s["bytes_sent_per_worker"] == 30 * 2 * 4 * N_PARAMS
  assert s["spectral_gap"] == pytest.approx(2 / 3)  # ring of 4, Metropolis-Hastings 1/3
  assert 0 < s["consensus_distance"] < 1.0
  assert s["test_accuracy"] > 0.6
  lines = [json.loads(l) for l in open(tmp_path / "w" / "metrics.jsonl")]
  assert all(l["bytes_sent"] == 2 * 4 * N_PARAMS for l in lines if "bytes_sent" in l)


def test_choco_top_k_sends_a_fiftieth_of_allreduce(tfds_dir, tmp_path):
  base = {"comm.workers": 8}
  ar = train_and_evaluate(small_config(steps=10, **base), str(tmp_path / "ar"))
  choco = train_and_evaluate(small_config(steps=10, **base, **{
      "comm.algorithm": "choco", "comm.compressor": "top_k", "comm.ratio": 0.01,
      "comm.gamma": 0.3}), str(tmp_path / "choco"))
  assert choco["bytes_sent_per_worker"] * 50 <= ar["bytes_sent_per_worker"]
  # ring allreduce: 2 (W-1)/W of the float32 gradient per step
  assert ar["bytes_sent_per_worker"] == pytest.approx(10 * 2 * 7 / 8 * 4 * N_PARAMS)


@pytest.mark.parametrize("comm", [
    {"comm.algorithm": "choco", "comm.compressor": "top_k", "comm.gamma": 0.3},
    {"comm.algorithm": "allreduce", "comm.compressor": "bfp8_b64"},
])
def test_resume_with_communication_state_is_exact(tfds_dir, tmp_path, comm):
  c = lambda: small_config(steps=12, **{"comm.workers": 4, **comm})
  whole = train_and_evaluate(c(), str(tmp_path / "whole"))
  part = str(tmp_path / "part")
  train_and_evaluate(c(), part, stop=StopAfter(5))
  resumed = train_and_evaluate(c(), part)
  assert resumed["resumed_from_step"] == 5
  assert resumed["params_fingerprint"] == whole["params_fingerprint"]
  assert resumed["bytes_sent_per_worker"] == whole["bytes_sent_per_worker"]


def test_fingerprint_covers_every_worker(tfds_dir, tmp_path):
  """Workers of a gossip run hold different models; their average is what is evaluated,
  but the fingerprint records all of them."""
  c = small_config(steps=10, **{"comm.workers": 2, "comm.algorithm": "dpsgd"})
  s = train_and_evaluate(c, str(tmp_path / "w"))
  single = train_and_evaluate(small_config(steps=10), str(tmp_path / "single"))
  assert s["params_fingerprint"] != single["params_fingerprint"]
  assert s["consensus_distance"] > 0


@pytest.mark.slow
def test_same_result_on_one_and_on_four_devices(tfds_dir, tmp_path):
  """Gossip moves data with ppermute only: 8 workers stacked on 1 device or spread over
  4 (simulated) devices give the same parameters bit for bit."""
  args = ["--config", "configs/default.py", "--config.model=mlp", "--config.steps=15",
          "--config.batch_size=32", "--config.optimizer.warmup_steps=2", "--config.comm.workers=8",
          "--config.comm.algorithm=dpsgd", "--config.checkpoint_every=0"]
  prints = {}
  for devices in (1, 4):
    env = dict(os.environ, JAX_NUM_CPU_DEVICES=str(devices), NPROC=str(4 * devices))
    wd = tmp_path / f"d{devices}"
    r = subprocess.run([sys.executable, "-m", "launch.train", *args, "--workdir", str(wd)],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"8 workers on {devices} device(s)" in r.stderr
    prints[devices] = json.load(open(wd / "summary.json"))["params_fingerprint"]
  assert prints[1] == prints[4]


@pytest.mark.parametrize("comm,needle", [
    ({"comm.workers": 3}, "divisible by 'comm.workers'"),
    ({"comm.workers": 4, "comm.algorithm": "dpsgd", "comm.compressor": "top_k"}, "dpsgd"),
    ({"comm.workers": 4, "comm.algorithm": "gossip"}, "comm.algorithm"),
    ({"comm.workers": 4, "comm.topology": "star", "comm.algorithm": "choco"}, "comm.topology"),
])
def test_invalid_comm_configs_fail_before_training(tfds_dir, tmp_path, comm, needle):
  with pytest.raises(ConfigError, match=needle):
    train_and_evaluate(small_config(**comm), str(tmp_path / "w"))
  assert not (tmp_path / "w").exists()
