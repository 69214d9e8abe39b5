"""launch.bench_interference: chunk time after each kind of in-between work."""

import json
import os
import subprocess
import sys

import pytest

from launch import bench_interference as bi

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class _FakeDevice:
  """A fake clock and chunk: a chunk takes 100 us, or 150 us right after `slow` work;
  the input is not ready once, before the fifth chunk."""

  def __init__(self):
    self.now = 0.0
    self.after_slow = False
    self.calls = 0
    self.waited = False

  def clock(self):
    return self.now

  def run_chunk(self):
    self.now += 150e-6 if self.after_slow else 100e-6
    self.after_slow = False
    self.calls += 1

  def input_ready(self):
    if self.calls == 4 and not self.waited:
      self.waited = True
      return False
    return True

  def kinds(self):
    def slow():
      self.now += 20e-6
      self.after_slow = True
    return {"none": lambda: None, "slow": slow}


def test_each_chunk_is_charged_to_the_work_before_it_and_waits_are_dropped(monkeypatch):
  dev = _FakeDevice()
  monkeypatch.setattr(bi.time, "sleep", lambda s: None)
  raw = bi.measure(dev.run_chunk, dev.input_ready, dev.kinds(), 200, seed=3, clock=dev.clock)
  assert dev.calls == 200 and raw["dropped"] == 1
  n = {k: len(v) for k, v in raw["chunk_s"].items()}
  assert n["none"] + n["slow"] == 199 and min(n.values()) > 50
  assert raw["chunk_s"]["none"] == pytest.approx([100e-6] * n["none"])
  assert raw["chunk_s"]["slow"] == pytest.approx([150e-6] * n["slow"])
  s = bi.summarize(raw, resamples=200)
  assert s["none"]["ratio"] == 1.0 and s["slow"]["ratio"] == pytest.approx(1.5)
  assert s["slow"]["ratio_ci90"] == [pytest.approx(1.5), pytest.approx(1.5)]
  assert s["slow"]["median_us"] == pytest.approx(150) and s["slow"]["work_us"] == pytest.approx(20)
  assert s["none"]["work_us"] == pytest.approx(0, abs=1e-9)
  assert "| slow | " in bi.table(s)


def test_the_nth_chunk_after_the_work_is_the_one_timed(monkeypatch):
  dev = _FakeDevice()
  monkeypatch.setattr(bi.time, "sleep", lambda s: None)
  raw = bi.measure(dev.run_chunk, dev.input_ready, dev.kinds(), 100, seed=3, clock=dev.clock,
                   nth=2)
  assert dev.calls == 200   # two chunks a round, the first after `slow` untimed
  assert raw["chunk_s"]["slow"] == pytest.approx([100e-6] * len(raw["chunk_s"]["slow"]))
  assert raw["work_s"]["slow"] == pytest.approx([20e-6] * len(raw["work_s"]["slow"]))


def test_the_median_interval_brackets_the_median_and_the_ratio_follows_the_data():
  raw = {"chunk_s": {"none": [1e-4, 1.1e-4, 0.9e-4, 1e-4, 1.05e-4] * 20,
                     "x": [2e-4, 2.2e-4, 1.8e-4, 2e-4, 2.1e-4] * 20},
         "work_s": {"none": [0.0] * 100, "x": [1e-5] * 100}}
  s = bi.summarize(raw, resamples=300, seed=1)
  for r in s.values():
    assert r["ci90_us"][0] <= r["median_us"] <= r["ci90_us"][1]
  assert s["x"]["ratio"] == pytest.approx(2.0)
  assert s["x"]["ratio_ci90"][0] <= 2.0 <= s["x"]["ratio_ci90"][1]


def _run(*args, timeout=300):
  env = dict(os.environ)
  env.pop("NPROC", None)
  return subprocess.run([sys.executable, "-m", "launch.bench_interference", *args],
                        cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("args,message", [
    (["--chunks", "0"], "--chunks must be >= 1"),
    (["--bootstrap", "-1"], "--bootstrap must be >= 1"),
    (["--nth", "0"], "--nth must be >= 1"),
    (["--cpu", "4096"], "is not one of this process's CPUs"),
])
def test_bad_arguments_exit_2_with_a_clear_message(args, message):
  r = _run(*args, timeout=120)
  assert r.returncode == 2, r.stderr[-2000:]
  assert message in r.stderr


@pytest.mark.slow
def test_the_benchmark_measures_every_kind_on_the_served_setup(tmp_path):
  out = tmp_path / "interference.json"
  r = _run("--chunks", "100", "--bootstrap", "100", "--out", str(out))
  assert r.returncode == 0, r.stderr[-3000:]
  res = json.loads(out.read_text())
  s = res["summary"]
  assert set(s) == set(bi.KINDS)
  assert sum(v["n"] for v in s.values()) + res["dropped"] == 100 and res["nth"] == 1
  assert res["environment"]["NPROC"] == "1"
  assert "xla_cpu_enable_concurrency_optimized_scheduler=false" in res["environment"]["XLA_FLAGS"]
  assert s["none"]["ratio"] == 1.0
  for name, v in s.items():
    assert v["median_us"] > 0 and v["ci90_us"][0] <= v["median_us"] <= v["ci90_us"][1], name
  assert s["sleep_300us"]["work_us"] >= 300 and s["spin_300us"]["work_us"] >= 300
  assert s["serving"]["work_us"] > s["batch_2"]["work_us"]
  assert "| serving |" in r.stdout
