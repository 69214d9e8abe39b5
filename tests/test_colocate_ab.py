"""`launch.colocate_ab`: argument handling, the per-round scores and their summary (pure
functions), and one short end-to-end run of two variants (wall-clock: `serial`)."""

import json
import math

import pytest

from launch import colocate_ab as ab


def test_variants_and_repos_parse_in_order_and_bad_ones_are_errors():
  assert ab.parse_pairs(["old=--config.serve.chunk_overrun=0", "new="], "variant") == {
      "old": "--config.serve.chunk_overrun=0", "new": ""}
  assert list(ab.parse_pairs(["b=1", "a=2"], "variant")) == ["b", "a"]
  for bad in (["nameonly"], ["=x"], ["a=1", "a=2"]):
    with pytest.raises(ValueError, match="--variant"):
      ab.parse_pairs(bad, "variant")
  assert ab.variant_overrides("") == []
  assert ab.variant_overrides("--config.serve.a=1; --config.serve.b=x;") == [
      "--config.serve.a=1", "--config.serve.b=x"]


def test_round_orders_alternate_so_each_variant_sits_at_the_same_mean_position():
  orders = ab.round_orders(["x", "y", "z"], 4)
  assert orders == [["x", "y", "z"], ["z", "y", "x"]] * 2
  for name in "xyz":
    assert sum(o.index(name) for o in orders) / 4 == 1.0


def test_score_is_retention_over_a_idle_and_p99_ratio():
  s = ab.score(1000.0, {"U": 0.4, "p99_ms": 4.0}, {"train_samples_per_s": 450.0, "p99_ms": 5.0})
  assert s == {"retention": 0.45, "harvest": pytest.approx(0.75), "p99_inflation": 1.25}
  assert math.isnan(ab.score(0.0, {"U": 0.4, "p99_ms": 4.0},
                             {"train_samples_per_s": 1.0, "p99_ms": 5.0})["harvest"])


def _row(rate, name, r, harvest, d_att=1.0):
  a = {"slo_attainment": 1.0, "p99_ms": 4.0, "U": 0.5, "shed_fraction": 0.0}
  d = {"slo_attainment": d_att, "slo_attainment_admitted": 1.0, "p99_ms": 5.0, "U": 0.4,
       "shed_fraction": 0.01}
  return {"rate": rate, "variant": name, "round": r, "A": a, "D": d, "harvest": harvest,
          "retention": harvest / 2, "p99_inflation": 1.25}


def test_summary_means_per_rate_and_variant_and_its_table():
  rows = [_row(100, "old", 0, 0.5), _row(100, "new", 0, 0.8, 0.99),
          _row(100, "new", 1, 0.7, 0.97), _row(100, "old", 1, 0.6),
          _row(200, "old", 0, 0.4), _row(200, "new", 0, 0.6)]
  s = ab.summarize(rows)
  assert [(x["rate"], x["variant"], x["rounds"]) for x in s] == [
      (100, "old", 2), (100, "new", 2), (200, "old", 1), (200, "new", 1)]
  assert s[0]["harvest"] == pytest.approx(0.55) and s[0]["harvest_rounds"] == [0.5, 0.6]
  assert s[1]["D_slo_attainment"] == pytest.approx(0.98)
  assert s[1]["D_slo_attainment_admitted"] == 1.0
  assert s[1]["U"] == 0.5 and s[1]["U_own_D"] == 0.4 and s[1]["D_shed"] == 0.01
  t = ab.table(s).splitlines()
  assert len(t) == 2 + 4 and "| 100 | new | 0.750 (0.80 / 0.70) |" in t[3]


@pytest.mark.parametrize("args, message", [
    (["--variant", "a="], "at least two"),
    (["--variant", "a=", "--variant", "a=x"], "given twice"),
    (["--variant", "a=", "--variant", "b=", "--repo", "c=/tmp"], "names no variant"),
    (["--variant", "a=", "--variant", "b=", "--repo", "b=/nonexistent"], "no launch/serve.py"),
    (["--variant", "a=", "--variant", "b=", "--rounds", "0"], "must be positive"),
])
def test_bad_arguments_exit_2_before_starting_anything(args, message, tmp_path, capsys):
  base = ["--slo_ms", "8", "--rates", "100", "--out", str(tmp_path / "ab.json")]
  with pytest.raises(SystemExit) as e:
    ab.main(base + args)
  assert e.value.code == 2 and message in capsys.readouterr().err
  assert not (tmp_path / "ab.json").exists()


@pytest.mark.slow
@pytest.mark.serial   # servers under load: wall-clock timing, runs alone
def test_two_variants_run_end_to_end(tfds_dir, tmp_path, capsys):
  out = tmp_path / "ab.json"
  assert ab.main(["--variant", "ov0=--config.serve.chunk_overrun=0", "--variant", "ov1=",
                  "--slo_ms", "20", "--rates", "300", "--rounds", "2", "--seconds", "1.5",
                  "--out", str(out)]) == 0
  result = json.loads(out.read_text())
  assert result["variants"] == {"ov0": "--config.serve.chunk_overrun=0", "ov1": ""}
  assert [(r["round"], r["variant"]) for r in result["rows"]] == [
      (0, "ov0"), (0, "ov1"), (1, "ov1"), (1, "ov0")]
  for r in result["rows"]:
    assert r["B"]["train_samples_per_s"] > 0 and r["D"]["train_samples_per_s"] > 0
    assert r["A"]["train_samples_per_s"] == 0 and 0 < r["A"]["U"] < 1
    assert r["D"]["slo_attainment"] > 0.9 and r["A"]["slo_attainment"] > 0.9
    assert r["harvest"] == pytest.approx(
        r["D"]["train_samples_per_s"] / r["B"]["train_samples_per_s"] / (1 - r["A"]["U"]))
  assert [s["variant"] for s in result["summary"]] == ["ov0", "ov1"]
  assert "| 300 | ov1 |" in capsys.readouterr().out
