"""launch.bench_buckets: the served model's predict per batch size and the padding
overhead of each bucket scheme."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_bench_buckets_times_every_size_and_each_schemes_padding(tmp_path):
  out = tmp_path / "buckets.json"
  r = subprocess.run([sys.executable, "-m", "launch.bench_buckets", "--max_batch", "6",
                      "--repeats", "3", "--out", str(out)], cwd=ROOT, capture_output=True,
                     text=True, timeout=600)
  assert r.returncode == 0, r.stderr
  res = json.loads(out.read_text())
  t = {int(n): v for n, v in res["us_per_batch"].items()}
  assert sorted(t) == [1, 2, 3, 4, 5, 6] and all(v > 0 for v in t.values())
  pow2, quarter = res["schemes"]["pow2"], res["schemes"]["quarter_octave"]
  assert pow2["buckets"] == [1, 2, 4, 6] and quarter["buckets"] == [1, 2, 3, 4, 5, 6]
  # every size up to 8 has its own bucket: no padding at all
  assert quarter["mean"] == 1.0 and quarter["max"] == 1.0
  ratios = {3: t[4] / t[3], 5: t[6] / t[5]}
  assert pow2["max"] == pytest.approx(max(1.0, *ratios.values()))
  assert pow2["mean"] == pytest.approx((4 + sum(ratios.values())) / 6)
  assert "xla_cpu_enable_concurrency_optimized_scheduler=false" in res["xla_flags"]
  assert "| quarter_octave | 6 | 1.000 |" in r.stdout


def test_bench_buckets_rejects_bad_arguments(tmp_path):
  r = subprocess.run([sys.executable, "-m", "launch.bench_buckets", "--max_batch", "1",
                      "--out", str(tmp_path / "x.json")], cwd=ROOT, capture_output=True,
                     text=True, timeout=120)
  assert r.returncode == 2 and "--max_batch must be >= 2" in r.stderr
  r = subprocess.run([sys.executable, "-m", "launch.bench_buckets", "--cpu", "999",
                      "--out", str(tmp_path / "x.json")], cwd=ROOT, capture_output=True,
                     text=True, timeout=120)
  assert r.returncode == 2 and "--cpu 999 is not one of this process's CPUs" in r.stderr
  assert not (tmp_path / "x.json").exists()
