"""launch.bench_pooling: LeNet's gradient with either pooling, checked equal, timed."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_bench_pooling_checks_the_gradients_and_writes_a_row_per_batch(tmp_path):
  out = tmp_path / "pool.json"
  r = subprocess.run([sys.executable, "-m", "launch.bench_pooling", "--batches", "1,3",
                      "--repeats", "3", "--out", str(out)], cwd=ROOT, capture_output=True,
                     text=True, timeout=600)
  assert r.returncode == 0, r.stderr
  res = json.loads(out.read_text())
  assert [row["batch"] for row in res["rows"]] == [1, 3]
  for row in res["rows"]:
    assert row["gradients_identical"] is True
    assert row["max_pool_2x2_us"] > 0 and row["nn_max_pool_us"] > 0
    assert row["ratio"] == pytest.approx(row["max_pool_2x2_us"] / row["nn_max_pool_us"])
  assert "xla_cpu_enable_concurrency_optimized_scheduler=false" in res["xla_flags"]
  assert "| 3 |" in r.stdout


def test_bench_pooling_rejects_bad_arguments(tmp_path):
  r = subprocess.run([sys.executable, "-m", "launch.bench_pooling", "--batches", "1,x",
                      "--out", str(tmp_path / "x.json")], cwd=ROOT, capture_output=True,
                     text=True, timeout=120)
  assert r.returncode == 2 and "--batches must be comma-separated integers" in r.stderr
  assert not (tmp_path / "x.json").exists()
