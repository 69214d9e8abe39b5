"""The scaling report's network cost model against coltrain's own byte accounting."""

import json
import math
import os

import jax
import numpy as np
import pytest

from launch import bench_scaling as bs

ALPHA, BETA = 10e-6, 25e9 / 8


def test_allreduce_time_formula():
  m = 2e6
  assert bs.allreduce_time(m, 1, ALPHA, BETA) == 0.0
  assert bs.allreduce_time(m, 2, ALPHA, BETA) == pytest.approx(2 * ALPHA + m / BETA)
  t1024 = bs.allreduce_time(m, 1024, ALPHA, BETA)
  assert t1024 == pytest.approx(20 * ALPHA + 2 * 1023 / 1024 * m / BETA)
  # bandwidth term bounded by 2 M / beta; latency grows with log2(W)
  assert bs.allreduce_time(m, 4096, ALPHA, BETA) - t1024 == pytest.approx(
      4 * ALPHA + 2 * (4095 / 4096 - 1023 / 1024) * m / BETA)


def test_gossip_time_does_not_depend_on_workers():
  p = {"message_bytes": 3e4, "peers": 2}
  t = [bs.comm_time("choco", p, w, ALPHA, BETA) for w in (8, 64, 1024)]
  assert t[0] == t[1] == t[2] == pytest.approx(2 * ALPHA + 6e4 / BETA)


def _algorithm_bytes(alg, workers, like):
  """bytes a worker sends per step according to coltrain.comm (the implementation)."""
  from coltrain.comm.algorithms import make_algorithm
  from coltrain.train.optim import make_optimizer
  from configs.default import get_config
  c = get_config()
  tx, _ = make_optimizer(c.optimizer, c.steps)
  comm = c.comm.copy_and_resolve_references()
  comm.workers = workers
  for arg in bs.ALGORITHMS[alg]:
    key, value = arg[len("--config.comm."):].split("=")
    comm[key] = type(comm[key])(value)
  alg_obj = make_algorithm(comm, tx=tx, track_consensus=False, seed=0)
  return float(np.mean(alg_obj.bytes_per_step(0, like)))


@pytest.fixture(scope="module")
def lenet_like():
  import jax.numpy as jnp
  from coltrain.models import get_model
  model = get_model("lenet", 10)
  return jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 28, 28, 1)),
                                           train=False))["params"]


@pytest.mark.parametrize("alg", ["allreduce", "choco", "powersgd"])
def test_message_pattern_matches_the_implementation_at_other_worker_counts(alg, lenet_like):
  """The model's messages, summed the way the model sends them (ring-equivalent bytes
  for allreduce rounds, one message per peer for gossip), equal the bytes coltrain
  counts for the same algorithm at W = 8 and at W = 64."""
  p = bs.message_pattern(alg)
  assert p["num_params"] == 496_138
  for w in (8, 64):
    if alg == "allreduce":
      model_bytes = 2 * (w - 1) / w * p["allreduce_bytes"]
    elif alg == "powersgd":
      model_bytes = sum(2 * (w - 1) / w * b for b in p["rounds_bytes"])
    else:
      model_bytes = p["peers"] * p["message_bytes"]
    assert model_bytes == pytest.approx(_algorithm_bytes(alg, w, lenet_like), rel=1e-12)
  if alg == "choco":  # top_k 1 %: float32 value + uint16 offset per kept entry
    assert p["message_bytes"] == pytest.approx(6 * 0.01 * 496_138, rel=0.01)


def test_steps_to_target(tmp_path):
  path = tmp_path / "metrics.jsonl"
  lines = [{"step": 50, "accuracy": 0.5}, {"step": 100, "test_accuracy": 0.99},
           {"step": 100, "accuracy": 0.97}, {"step": 150, "accuracy": 0.981},
           {"step": 200, "accuracy": 0.99}]
  path.write_text("".join(json.dumps(l) + "\n" for l in lines))
  assert bs.steps_to_target(str(path), 0.98) == 150
  assert bs.steps_to_target(str(path), 0.995) is None
  assert bs.steps_to_target(str(tmp_path / "missing.jsonl"), 0.9) is None


def test_projection_rows():
  compute = {"allreduce": 0.01, "choco": 0.012}
  patterns = {"allreduce": {"allreduce_bytes": 2e6},
              "choco": {"message_bytes": 3e4, "peers": 2}}
  rows = bs.project(compute, patterns, {"allreduce": 200, "choco": 500},
                    compute_scale=10.0)
  assert len(rows) == 2 * len(bs.LINKS_GBPS) * len(bs.PROJECT_WORKERS)
  for r in rows:
    assert r["compute_s"] == pytest.approx(compute[r["algorithm"]] / 10)
    assert r["step_s"] == pytest.approx(r["compute_s"] + r["comm_s"])
    assert r["time_to_target_s"] == pytest.approx(r["step_s"] * r["steps_to_target"])
  ar = {(r["link_gbps"], r["workers"]): r["comm_s"] for r in rows
        if r["algorithm"] == "allreduce"}
  assert ar[(25.0, 1024)] > ar[(25.0, 64)] > ar[(25.0, 8)]
  assert ar[(100.0, 1024)] < ar[(25.0, 1024)]


def test_report_from_measurements(tmp_path):
  """--no-measure: the report, json and plot from existing measurements and runs."""
  out = tmp_path / "out"
  out.mkdir()
  measured = [{"algorithm": a, "workers": w, "processes": p, "devices_per_process": d,
               "steps": 30, "step_s": 0.1 * w / d + 0.01 * p,
               "bytes_per_worker_per_step": 1000.0 * w, "wall_s": 1.0,
               "test_accuracy": 0.5}
              for a in ("allreduce", "choco") for (w, p, d) in
              [(8, 1, 1), (8, 1, 8), (8, 4, 2)]]
  (out / "measured.json").write_text(json.dumps(measured))
  runs = tmp_path / "runs"
  for name, at in (("allreduce", 200), ("choco_top_k_ring", 450)):
    (runs / name).mkdir(parents=True)
    (runs / name / "metrics.jsonl").write_text("".join(
        json.dumps({"step": s, "accuracy": 0.99 if s >= at else 0.9}) + "\n"
        for s in range(50, 1501, 50)))
  assert bs.main(["--out", str(out), "--no-measure", "--algorithms", "allreduce,choco",
                  "--comm_runs", str(runs)]) == 0
  proj = json.loads((out / "projection.json").read_text())
  assert proj["steps_to_target"] == {"allreduce": 200, "choco": 450}
  assert proj["compute_s"]["allreduce"] == pytest.approx((0.1 * 8 + 0.01) / 8)
  text = (out / "scaling.md").read_text()
  assert "| allreduce | 8 | 4 x 2 |" in text and "W=1024" in text
  assert os.path.getsize(out / "projection.png") > 1000
