"""launch.bench_request_path: the device thread's serving work per request, measured
through the real bridge and scheduler, in this checkout and (`--repo`) another one."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_bench_request_path_measures_each_size_and_compares_checkouts(tmp_path):
  out = tmp_path / "path.json"
  # the same checkout under a second name: the comparison machinery, not a speed claim
  r = subprocess.run([sys.executable, "-m", "launch.bench_request_path", "--sizes", "1,3",
                      "--iterations", "50", "--rounds", "1", "--repo", f"again={ROOT}",
                      "--out", str(out)], cwd=ROOT, capture_output=True, text=True,
                     timeout=900)
  assert r.returncode == 0, r.stderr
  res = json.loads(out.read_text())
  assert res["repos"] == {"this": ROOT, "again": ROOT}
  assert [len(res["rounds"][name]) for name in ("this", "again")] == [1, 1]
  rows = {(row["checkout"], row["size"]): row for row in res["summary"]}
  assert sorted(rows) == [("again", 1), ("again", 3), ("this", 1), ("this", 3)]
  for row in rows.values():
    assert row["admit_us"] > 0 and row["results_us"] > 0 and row["device_us_per_image"] > 0
    assert row["serving_us"] == pytest.approx(row["admit_us"] + row["results_us"])
    assert row["overhead"] == pytest.approx(row["serving_us"] / row["device_us_per_image"])
  assert rows[("this", 1)]["vs_this"] == 1.0 and rows[("this", 3)]["vs_this"] == 1.0
  assert rows[("again", 3)]["vs_this"] == pytest.approx(
      rows[("again", 3)]["serving_us"] / rows[("this", 3)]["serving_us"])
  assert "| this | 3 |" in r.stdout and "| again | 1 |" in r.stdout


def test_bench_request_path_rejects_bad_arguments(tmp_path):
  for args, msg in ((["--sizes", "0"], "--sizes must be >= 1"),
                    (["--sizes", "a"], "--sizes must be integers"),
                    (["--repo", "x"], "--repo must be NAME=PATH"),
                    (["--repo", f"x={tmp_path}"], "no coltrain serving code there")):
    r = subprocess.run([sys.executable, "-m", "launch.bench_request_path", *args,
                        "--out", str(tmp_path / "x.json")], cwd=ROOT, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2 and msg in r.stderr, (args, r.stderr)
  assert not (tmp_path / "x.json").exists()
