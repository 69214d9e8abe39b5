"""Accuracy of every precision-policy preset on one config: table + plot.

  python -m launch.policy_sweep [--config configs/default.py] [--out results/policies]
      [--policies fp32,hbfp8_16,...] [--steps N]

Trains the config once per policy (same seed, same steps), then writes into --out:
  policies.json            one record per policy (summary.json fields + mantissa bits)
  policies.md              a markdown table (accuracy, delta vs fp32, steps/s)
  accuracy_vs_bits.png     test accuracy against GEMM mantissa bits
Each run's workdir is kept under --out/runs/<policy>, so an interrupted sweep resumes.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from launch.sweeps import labeled_scatter, load_config, override_steps, save_results

PRESETS = ("fp32", "hbfp8_16", "hbfp4_16", "hbfp4_booster", "mxfp8", "mxint8")


def mantissa_bits(policy_name: str, config) -> float:
  """Signed mantissa bits of the forward-GEMM format used by most layers in the policy's
  first phase (fp32: 24; MX float elements: mantissa bits + sign)."""
  import collections
  import jax.numpy as jnp
  from coltrain.data import open_dataset
  from coltrain.models import get_model
  from coltrain.numerics.formats import BFPFormat, MXFormat
  from coltrain.numerics.policy import make_policy
  if policy_name == "fp32":
    return 24
  _, spec = open_dataset(config.dataset, config.data_dir or None)
  model = get_model(config.model, spec.num_classes)
  resolved = make_policy(policy_name).resolve(
      model, jnp.zeros((1,) + spec.image_shape, jnp.float32), train=False)
  bits = []
  for dot in resolved.specs(0).values():
    fmt = dot.fwd.lhs
    bits.append(fmt.mantissa_bits if isinstance(fmt, BFPFormat)
                else fmt.man_bits + 1 if isinstance(fmt, MXFormat) else 24)
  return collections.Counter(bits).most_common(1)[0][0] if bits else 24


def write_table(records: list[dict], path: str) -> None:
  base = next((r["test_accuracy"] for r in records if r["policy"] == "fp32"), None)
  lines = ["| policy | GEMM mantissa bits | test accuracy | vs fp32 (pt) | train steps/s |",
           "| --- | --- | --- | --- | --- |"]
  for r in records:
    delta = "" if base is None else f"{100 * (r['test_accuracy'] - base):+.1f}"
    lines.append(f"| `{r['policy']}` | {r['mantissa_bits']:g} | {r['test_accuracy']:.4f} | "
                 f"{delta} | {r['train_steps_per_second']:.1f} |")
  with open(path, "w") as f:
    f.write("\n".join(lines) + "\n")


def write_plot(records: list[dict], path: str) -> None:
  labeled_scatter(path, [(r["mantissa_bits"], 100 * r["test_accuracy"], r["policy"])
                         for r in records],
                  xlabel="GEMM mantissa bits (incl. sign; fp32 = 24)",
                  ylabel="test accuracy (%)",
                  title="Precision policies on the same config and seed",
                  xscale={"value": "log", "base": 2})


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--config", default="configs/default.py")
  p.add_argument("--out", default="results/policies")
  p.add_argument("--policies", default=",".join(PRESETS))
  p.add_argument("--steps", type=int, default=0, help="override config.steps (0: keep)")
  args = p.parse_args(argv)
  from absl import logging
  logging.set_verbosity(logging.WARNING)
  from coltrain.train import train_and_evaluate

  os.makedirs(args.out, exist_ok=True)
  records = []
  for policy in args.policies.split(","):
    config = load_config(args.config)
    config.numerics.policy = policy
    override_steps(config, args.steps)
    summary = train_and_evaluate(config, os.path.join(args.out, "runs", policy))
    record = {"policy": policy, "mantissa_bits": mantissa_bits(policy, config),
              **{k: summary[k] for k in ("test_accuracy", "test_loss", "steps",
                                         "train_steps_per_second", "params_fingerprint")}}
    records.append(record)
    print(json.dumps(record), flush=True)
  save_results(args.out, "policies", records, write_table, write_plot, "accuracy_vs_bits.png")
  return 0


if __name__ == "__main__":
  sys.exit(main())
