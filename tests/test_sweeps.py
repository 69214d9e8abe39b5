"""The sweep commands end to end on a few steps: records, table and plot."""

import json

import pytest

from launch import comm_sweep, policy_sweep


@pytest.mark.slow
def test_policy_sweep_writes_table_and_plot(tfds_dir, tmp_path):
  out = tmp_path / "p"
  assert policy_sweep.main(["--out", str(out), "--steps", "4",
                            "--policies", "fp32,hbfp4_booster"]) == 0
  records = json.loads((out / "policies.json").read_text())
  assert [r["policy"] for r in records] == ["fp32", "hbfp4_booster"]
  assert [r["mantissa_bits"] for r in records] == [24, 4]
  assert all(0 <= r["test_accuracy"] <= 1 and r["steps"] == 4 for r in records)
  table = (out / "policies.md").read_text().splitlines()
  assert len(table) == 4 and "`hbfp4_booster` | 4 |" in table[3]
  assert (out / "accuracy_vs_bits.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
def test_comm_sweep_writes_table_and_plot(tfds_dir, tmp_path):
  out = tmp_path / "c"
  assert comm_sweep.main(["--out", str(out), "--steps", "3", "--workers", "2",
                          "--only", "allreduce,choco_top_k_ring"]) == 0
  records = json.loads((out / "comm.json").read_text())
  assert [r["name"] for r in records] == ["allreduce", "choco_top_k_ring"]
  assert records[1]["bytes_sent_per_worker"] < records[0]["bytes_sent_per_worker"] / 20
  assert "1/" in (out / "comm.md").read_text()
  assert (out / "accuracy_vs_bytes.png").read_bytes()[:4] == b"\x89PNG"
