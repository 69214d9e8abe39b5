"""Test accuracy vs bytes sent for the communication algorithms: table + plot.

  python -m launch.comm_sweep [--config configs/default.py] [--workers 8] [--steps N]
      [--lr LR] [--out results/comm] [--only NAME,NAME]

Trains the config once per setting below (same seed, steps and global batch; `--workers`
workers) and writes into --out:
  comm.json              one record per setting (summary.json fields)
  comm.md                a markdown table (accuracy, bytes per worker, ratio to allreduce)
  accuracy_vs_bytes.png  test accuracy against bytes sent per worker (log scale)
Each run's workdir is kept under --out/runs/<name>, so an interrupted sweep resumes.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from launch.sweeps import labeled_scatter, load_config, override_steps, save_results

# name -> comm.* overrides. CHOCO's consensus step gamma is tuned per compressor.
SETTINGS: dict[str, dict] = {
    "allreduce": {"algorithm": "allreduce"},
    "local_sgd_4": {"algorithm": "local_sgd", "local_steps": 4},
    "powersgd_r2": {"algorithm": "powersgd", "rank": 2},
    "dpsgd_ring": {"algorithm": "dpsgd", "topology": "ring"},
    "dpsgd_torus": {"algorithm": "dpsgd", "topology": "torus"},
    "dpsgd_exponential": {"algorithm": "dpsgd", "topology": "exponential"},
}
for _topo in ("ring", "torus", "exponential"):
  SETTINGS[f"choco_top_k_{_topo}"] = {"algorithm": "choco", "compressor": "top_k",
                                      "ratio": 0.01, "gamma": 0.1, "topology": _topo}
  SETTINGS[f"choco_sign_{_topo}"] = {"algorithm": "choco", "compressor": "sign",
                                     "gamma": 0.3, "topology": _topo}
  SETTINGS[f"choco_bfp4_{_topo}"] = {"algorithm": "choco", "compressor": "bfp4_b64",
                                     "gamma": 0.8, "topology": _topo}


def write_table(records: list[dict], path: str) -> None:
  base = next((r for r in records if r["name"] == "allreduce"), None)
  lines = ["| setting | test accuracy | vs allreduce (pt) | MB sent per worker | "
           "bytes / allreduce's | consensus distance | spectral gap |",
           "| --- | --- | --- | --- | --- | --- | --- |"]
  for r in records:
    dacc = f"{100 * (r['test_accuracy'] - base['test_accuracy']):+.1f}" if base else ""
    ratio = (f"1/{base['bytes_sent_per_worker'] / r['bytes_sent_per_worker']:.0f}"
             if base and r["bytes_sent_per_worker"] else "")
    lines.append(f"| `{r['name']}` | {r['test_accuracy']:.4f} | {dacc} | "
                 f"{r['bytes_sent_per_worker'] / 1e6:.1f} | {ratio} | "
                 f"{r['consensus_distance']:.3g} | {r['spectral_gap']:.3f} |")
  with open(path, "w") as f:
    f.write("\n".join(lines) + "\n")


def write_plot(records: list[dict], path: str) -> None:
  labeled_scatter(path, [(r["bytes_sent_per_worker"] / 1e6, 100 * r["test_accuracy"],
                          r["name"]) for r in records],
                  xlabel="MB sent per worker (whole run)",
                  ylabel="test accuracy (%) of the averaged model",
                  title="Accuracy vs communication", xscale={"value": "log"})


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--config", default="configs/default.py")
  p.add_argument("--out", default="results/comm")
  p.add_argument("--workers", type=int, default=8)
  p.add_argument("--steps", type=int, default=0, help="override config.steps (0: keep)")
  p.add_argument("--lr", type=float, default=0.0,
                 help="override optimizer.learning_rate for every setting (0: keep)")
  p.add_argument("--only", default="", help="comma-separated subset of settings")
  args = p.parse_args(argv)
  from absl import logging
  logging.set_verbosity(logging.WARNING)
  from coltrain.train import train_and_evaluate

  names = args.only.split(",") if args.only else list(SETTINGS)
  unknown = [n for n in names if n not in SETTINGS]
  if unknown:
    p.error(f"unknown settings {unknown}; known: {', '.join(SETTINGS)}")
  os.makedirs(args.out, exist_ok=True)
  records = []
  for name in names:
    config = load_config(args.config)
    config.comm.workers = args.workers
    for k, v in SETTINGS[name].items():
      config.comm[k] = v
    override_steps(config, args.steps)
    if args.lr > 0:
      config.optimizer.learning_rate = args.lr
    config.eval_every = 0
    summary = train_and_evaluate(config, os.path.join(args.out, "runs", name))
    record = {"name": name, **SETTINGS[name],
              **{k: summary[k] for k in ("test_accuracy", "test_loss", "steps",
                                         "bytes_sent_per_worker", "consensus_distance",
                                         "spectral_gap", "train_steps_per_second")}}
    records.append(record)
    print(json.dumps(record), flush=True)
  save_results(args.out, "comm", records, write_table, write_plot, "accuracy_vs_bytes.png")
  return 0


if __name__ == "__main__":
  sys.exit(main())
