"""Interleaved A/B of serving variants: harvest, SLO attainment and p99 per variant.

  python -m launch.colocate_ab --slo_ms 7.5 --rates 2000,2800 \\
      --variant old=--config.serve.chunk_overrun=0 --variant new= [--rounds 3] \\
      [--seconds 6] [--repo old=/path/to/other/checkout] --out ab.json

A variant is NAME=OVERRIDES: `launch.serve` overrides separated by `;` (empty: the
defaults), run from this checkout or, with `--repo NAME=PATH`, from another one (to
compare code versions). Every variant gets its own server (`configs/serve.py`, the
given SLO, the device on the last core, front ends and load generators on the others,
as in `launch.colocate_bench`). For each rate, `--rounds` rounds; in each round every
variant, in an order that alternates round by round (so a drift of the machine's speed
favours none), measures B (training alone, no requests), A (inference only, open-loop
Poisson at the rate) and D (both at once), `--seconds` each. Per variant and round:
retention = D's training samples/s / B's, harvest = retention / (1 - U) with U the
inference busy fraction of the variant's own A, p99 inflation = D's p99 / A's, and the
SLO attainments (of all requests, and of the admitted), shed fractions, chunk times and D's scheduler-thread split. Each
variant is compared with its own A and B, so the comparison holds even if a variant
changes A. Writes `--out` (all rounds and a `summary` of means per variant and rate)
and prints the summary table.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from typing import Optional

import numpy as np

from launch import colocate_bench as cb


def parse_pairs(values: list[str], what: str) -> dict[str, str]:
  """["NAME=VALUE", ...] -> {NAME: VALUE} (ordered); ValueError on a bad or repeated
  name."""
  out: dict[str, str] = {}
  for v in values:
    name, sep, value = v.partition("=")
    if not sep or not name:
      raise ValueError(f"--{what} must be NAME=VALUE, got {v!r}")
    if name in out:
      raise ValueError(f"--{what} {name!r} given twice")
    out[name] = value
  return out


def variant_overrides(spec: str) -> list[str]:
  """'--config.serve.a=1;--config.serve.b=2' -> the list of overrides (empty: none)."""
  return [o.strip() for o in spec.split(";") if o.strip()]


def round_orders(names: list[str], rounds: int) -> list[list[str]]:
  """The variants' order in each round: as given, then reversed, alternating."""
  return [list(names) if r % 2 == 0 else list(names)[::-1] for r in range(rounds)]


def score(b_sps: float, a: dict, d: dict) -> dict:
  """One variant's round: retention, harvest, p99 inflation (`cb.scores`) from B's
  samples/s, and A's and D's measurements (`train_samples_per_s`, `U`, `p99_ms`)."""
  s = cb.scores(d["train_samples_per_s"], b_sps, a["U"], d["p99_ms"], a["p99_ms"])
  return {"retention": s["retention"], "harvest": s["harvest_efficiency"],
          "p99_inflation": s["p99_inflation"]}


def summarize(rows: list[dict]) -> list[dict]:
  """Means over rounds per (rate, variant), in first-seen order."""
  keys: list[tuple[float, str]] = []
  for r in rows:
    if (r["rate"], r["variant"]) not in keys:
      keys.append((r["rate"], r["variant"]))
  out = []
  for rate, name in keys:
    rr = [r for r in rows if r["rate"] == rate and r["variant"] == name]
    mean = lambda f: float(np.mean([f(r) for r in rr]))
    out.append({"rate": rate, "variant": name, "rounds": len(rr),
                "harvest": mean(lambda r: r["harvest"]),
                "harvest_rounds": [round(r["harvest"], 3) for r in rr],
                "retention": mean(lambda r: r["retention"]),
                "p99_inflation": mean(lambda r: r["p99_inflation"]),
                "D_slo_attainment": mean(lambda r: r["D"]["slo_attainment"]),
                "D_slo_attainment_admitted": mean(
                    lambda r: r["D"].get("slo_attainment_admitted", float("nan"))),
                "A_slo_attainment": mean(lambda r: r["A"]["slo_attainment"]),
                "D_p99_ms": mean(lambda r: r["D"]["p99_ms"]),
                "A_p99_ms": mean(lambda r: r["A"]["p99_ms"]),
                "U": mean(lambda r: r["A"]["U"]), "U_own_D": mean(lambda r: r["D"]["U"]),
                "D_shed": mean(lambda r: r["D"]["shed_fraction"])})
  return out


def table(summary: list[dict]) -> str:
  lines = ["| rate (req/s) | variant | harvest (rounds) | retention | U (A) | U (D's own) | "
           "p99 inflation | D p99 (ms) | D attainment (admitted) | A attainment | D shed |",
           "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
  for s in summary:
    rounds = " / ".join(f"{h:.2f}" for h in s["harvest_rounds"])
    lines.append(f"| {s['rate']:.0f} | {s['variant']} | {s['harvest']:.3f} ({rounds}) | "
                 f"{s['retention']:.3f} | {s['U']:.3f} | {s['U_own_D']:.3f} | "
                 f"{s['p99_inflation']:.2f} | {s['D_p99_ms']:.2f} | "
                 f"{s['D_slo_attainment']:.4f} ({s['D_slo_attainment_admitted']:.4f}) | "
                 f"{s['A_slo_attainment']:.4f} | "
                 f"{100 * s['D_shed']:.2f} % |")
  return "\n".join(lines)


def measure_round(server: cb.ServeProcess, poll: cb.Poller, loadgen_args: list[str],
                  rate: float, round_index: int, seconds: float, slo_ms: float) -> dict:
  """One variant's round: B (`cb.training_window`), then A and D under open-loop
  Poisson load at `rate` for `seconds` each (`cb.load_window`), scored (`score`)."""
  b_sps, b_chunk = cb.training_window(server, poll, seconds)
  row = {"rate": rate, "round": round_index, "variant": server.name,
         "B": {"train_samples_per_s": b_sps, "chunk_ms": b_chunk}}
  for cfg in ("A", "D"):
    out, m = cb.load_window(server, poll, cfg, loadgen_args + [
        "--mode", "open", "--rate", str(rate), "--duration", str(seconds),
        "--slo_ms", str(slo_ms), "--seed", str(round_index)], seconds)
    row[cfg] = {"slo_attainment": out.get("slo_attainment", 0.0),
                "slo_attainment_admitted": out.get("slo_attainment_admitted", 0.0),
                "p99_ms": out["latency_ms"]["p99"], "p50_ms": out["latency_ms"]["p50"],
                "shed_fraction": out["shed_fraction"], "U": m["inference_busy_fraction"],
                "train_samples_per_s": m["train_samples_per_s"] or 0.0,
                "chunk_ms": m["chunk_ms"], "device_thread": m["device_thread"]}
  row.update(score(b_sps or 0.0, row["A"], row["D"]))
  cb.log(f"{rate:.0f} req/s round {round_index} {server.name}: harvest "
         f"{row['harvest']:.3f}, p99 inflation {row['p99_inflation']:.2f}, D attainment "
         f"{row['D']['slo_attainment']:.4f}, A {row['A']['slo_attainment']:.4f}")
  return row


def main(argv: Optional[list[str]] = None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--variant", action="append", default=[], required=True,
                 help="NAME=OVERRIDES (launch.serve overrides separated by ';'; repeat)")
  p.add_argument("--repo", action="append", default=[],
                 help="NAME=PATH: run variant NAME from another checkout")
  p.add_argument("--slo_ms", type=float, required=True, help="SLO of every server (ms)")
  p.add_argument("--rates", required=True, help="comma-separated request rates (req/s)")
  p.add_argument("--rounds", type=int, default=3)
  p.add_argument("--seconds", type=float, default=6.0, help="seconds per B, A and D")
  p.add_argument("--device_cpus", default="auto", help="as launch.colocate_bench")
  p.add_argument("--generator_priority", default="auto",
                 choices=("auto", "loadgen", "server", "none"),
                 help="as launch.colocate_bench")
  p.add_argument("--out", required=True)
  a = p.parse_args(argv)
  try:
    variants = parse_pairs(a.variant, "variant")
    repos = parse_pairs(a.repo, "repo")
    rates = [float(r) for r in a.rates.split(",")]
  except ValueError as e:
    p.error(str(e))
  if len(variants) < 2:
    p.error("give at least two --variant")
  if unknown := set(repos) - set(variants):
    p.error(f"--repo names no variant: {sorted(unknown)}")
  if any(r <= 0 for r in rates) or a.rounds < 1 or a.seconds <= 0 or a.slo_ms <= 0:
    p.error("--rates, --rounds, --seconds and --slo_ms must be positive")
  for name, path in repos.items():
    if not os.path.isfile(os.path.join(path, "launch", "serve.py")):
      p.error(f"--repo {name}={path}: no launch/serve.py there")

  device_cpus, host_cpus = cb.split_cpus(a.device_cpus)
  try:
    priority = cb.generator_priority(a.generator_priority)
  except ValueError as e:
    p.error(str(e))
  work = tempfile.mkdtemp(prefix="colocate_ab_")
  images = os.path.join(work, "mnist_test.npz")
  cb.write_images(images)
  lg = ["--model", "lenet", "--images", images, "--binary"]
  if device_cpus:
    lg += ["--cpus", ",".join(map(str, sorted(host_cpus)))]
  lg += cb.priority_args(priority)
  servers: dict[str, cb.ServeProcess] = {}
  rows: list[dict] = []
  t_begin = time.time()
  try:
    for name, spec in variants.items():
      s = cb.ServeProcess(name, work, [f"--config.serve.slo_ms={a.slo_ms}",
                                       "--config.serve.model_name=lenet",
                                       f"--config.serve.device_cpus={device_cpus}",
                                       *variant_overrides(spec)],
                          repo=repos.get(name, cb.REPO), nice=priority["server_nice"])
      servers[name] = s
      s.wait_ready()
      s.training(False)
    poll = cb.Poller(servers, cpus=host_cpus if device_cpus else None).start()
    try:
      for rate in rates:
        for r, order in enumerate(round_orders(list(variants), a.rounds)):
          for name in order:
            rows.append(measure_round(servers[name], poll, lg, rate, r, a.seconds,
                                      a.slo_ms))
    finally:
      poll.stop()
  finally:
    for s in servers.values():
      s.stop()
  summary = summarize(rows)
  result = {"variants": variants, "repos": repos, "slo_ms": a.slo_ms, "rates": rates,
            "rounds": a.rounds, "seconds": a.seconds, "device_cpus": device_cpus,
            "priority": priority, "wall_s": round(time.time() - t_begin, 1), "rows": rows,
            "summary": summary}
  os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
  with open(a.out, "w") as f:
    json.dump(result, f, indent=1)
  print(table(summary))
  return 0


if __name__ == "__main__":
  sys.exit(main())
