"""Scaling report: measured step time and bytes for 1-8 workers, and a network cost model
projecting time per step and time to a target accuracy to 64-1024 workers.

  python -m launch.bench_scaling --out results/scaling            # measure + project
  python -m launch.bench_scaling --out results/scaling --no-measure  # re-project only

Measurement (this machine): the default config (LeNet, global batch 64) for a few steps
per layout, W workers as P processes x D devices each (`launch.multiprocess` for P > 1,
simulated CPU devices), for allreduce, CHOCO (top_k 1 %, ring, gamma 0.1) and PowerSGD
(rank 2). Records steady-state seconds per step and bytes sent per worker per step
(coltrain's exact payload accounting) into `measured.json` (reused unless --remeasure).

Model (`project`): one step of a worker = compute + communication, not overlapped:
  t_step(W) = t_compute(alg) + t_comm(alg, W)
  t_compute: measured per worker-step on this machine: the step time of 8 workers stacked
             on ONE device (they run one after another, communication is a local copy)
             divided by 8 -- local gradient plus the algorithm's own compute (top-k,
             orthogonalisation). `--compute_scale` projects faster accelerators.
  links:     every worker has one full-duplex link of bandwidth beta (bytes/s) and a
             per-message latency alpha; messages to different peers share the link.
  allreduce: bandwidth-optimal allreduce (Rabenseifner: reduce-scatter + all-gather by
             recursive halving/doubling): 2 log2(W) alpha + 2 (W-1)/W * M / beta, M the
             float32 gradient. (coltrain's byte count, 2 (W-1)/W M, is the same.)
  powersgd:  two such allreduces per step (P, then Q), of the sizes coltrain sends.
  choco:     point-to-point gossip on a ring: each worker sends its compressed update q
             (top_k: float32 values + uint16 offsets) to its 2 neighbours:
             2 alpha + 2 |q| / beta, independent of W.
  steps to target: the steps the measured 8-worker runs (results/comm, 1,500 steps)
             needed to first reach the target training accuracy (mean of a 50-step
             logging window), assumed unchanged at W workers (same per-worker batch, so
             the global batch grows with W, and ideal large-batch scaling). This is
             optimistic for every algorithm and most for CHOCO on a ring, whose mixing
             (spectral gap ~ 2 pi^2 / W^2) slows consensus at large W; its projections
             are lower bounds.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from typing import Any

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

ALGORITHMS = {
    "allreduce": ["--config.comm.algorithm=allreduce"],
    "choco": ["--config.comm.algorithm=choco", "--config.comm.compressor=top_k",
              "--config.comm.ratio=0.01", "--config.comm.topology=ring",
              "--config.comm.gamma=0.1"],
    "powersgd": ["--config.comm.algorithm=powersgd", "--config.comm.rank=2"],
}
# The results/comm runs (8 workers, 1,500 steps, lr 0.025) that give steps to target.
COMM_RUNS = {"allreduce": "allreduce", "choco": "choco_top_k_ring",
             "powersgd": "powersgd_r2"}
# (workers, processes, devices per process); workers = processes * devices * stacked.
LAYOUTS = {
    "allreduce": [(8, 1, 1), (2, 1, 2), (2, 2, 1), (4, 1, 4), (4, 4, 1), (8, 1, 8),
                  (8, 4, 2)],
    "choco": [(8, 1, 1), (8, 4, 2)],
    "powersgd": [(8, 1, 1)],
}
PROJECT_WORKERS = (8, 64, 256, 1024)
LINKS_GBPS = (25.0, 100.0)
ALPHA_S = 10e-6          # per-message latency (TCP within a datacenter; RDMA ~2-5 us)
TARGET_TRAIN_ACCURACY = 0.98


# --------------------------------------------------------------------------------------
# Cost model
# --------------------------------------------------------------------------------------

def allreduce_time(message_bytes: float, workers: int, alpha: float, beta: float) -> float:
  """Rabenseifner allreduce of `message_bytes` over `workers` (0 for one worker)."""
  if workers <= 1:
    return 0.0
  return (2 * math.ceil(math.log2(workers)) * alpha
          + 2 * (workers - 1) / workers * message_bytes / beta)


def gossip_time(message_bytes: float, peers: int, alpha: float, beta: float) -> float:
  """Sending one message to each of `peers` neighbours over one link."""
  return peers * alpha + peers * message_bytes / beta


def comm_time(alg: str, pattern: dict, workers: int, alpha: float, beta: float) -> float:
  """Communication seconds per step of `alg` (pattern: see `message_pattern`)."""
  if alg == "allreduce":
    return allreduce_time(pattern["allreduce_bytes"], workers, alpha, beta)
  if alg == "powersgd":
    return sum(allreduce_time(b, workers, alpha, beta) for b in pattern["rounds_bytes"])
  if alg == "choco":
    return gossip_time(pattern["message_bytes"], pattern["peers"], alpha, beta)
  raise ValueError(alg)


def message_pattern(alg: str) -> dict:
  """The messages one worker sends per step under coltrain's implementation for the
  default config's model (LeNet), with bytes from `Algorithm.bytes_per_step`."""
  import jax
  import numpy as np
  from coltrain.comm.algorithms import make_algorithm
  from coltrain.models import get_model
  from coltrain.train.optim import make_optimizer
  from configs.default import get_config
  import jax.numpy as jnp

  config = get_config()
  model = get_model(config.model, 10)
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0),
                                             jnp.zeros((1, 28, 28, 1)), train=False))
  like = shapes["params"]
  num_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(like))
  tx, _ = make_optimizer(config.optimizer, config.steps)
  comm = config.comm.copy_and_resolve_references()
  comm.workers = 8
  for arg in ALGORITHMS[alg]:
    key, value = arg[len("--config.comm."):].split("=")
    comm[key] = type(comm[key])(value)
  algo = make_algorithm(comm, tx=tx, track_consensus=False, seed=0)
  per_worker = float(np.mean(algo.bytes_per_step(0, like)))
  w = 8
  if alg == "allreduce":
    return {"num_params": num_params, "allreduce_bytes": 4.0 * num_params,
            "bytes_per_step_w8": per_worker}
  if alg == "powersgd":
    total = per_worker * w / (2 * (w - 1))  # both rounds together
    from coltrain.comm import compressors as comp
    p_bytes = q_bytes = 0
    for x in jax.tree.leaves(like):
      ms = comp.matrix_shape(tuple(x.shape))
      if ms is None:
        p_bytes += 4 * int(np.prod(x.shape))
      else:
        r = comp.powersgd_rank(tuple(x.shape), comm.rank)
        p_bytes += 4 * r * ms[0]
        q_bytes += 4 * r * ms[1]
    assert abs(p_bytes + q_bytes - total) < 1e-6 * total, (p_bytes, q_bytes, total)
    return {"num_params": num_params, "rounds_bytes": [float(p_bytes), float(q_bytes)],
            "bytes_per_step_w8": per_worker}
  if alg == "choco":
    peers = 2  # ring
    return {"num_params": num_params, "message_bytes": per_worker / peers, "peers": peers,
            "bytes_per_step_w8": per_worker}
  raise ValueError(alg)


def steps_to_target(metrics_path: str, target: float) -> int | None:
  """First logged step whose training accuracy (window mean) reaches `target`."""
  if not os.path.exists(metrics_path):
    return None
  with open(metrics_path) as f:
    for line in f:
      d = json.loads(line)
      if "accuracy" in d and d["accuracy"] >= target:
        return int(d["step"])
  return None


def project(compute_s: dict, patterns: dict, steps: dict, *, alpha: float = ALPHA_S,
            links_gbps=LINKS_GBPS, workers=PROJECT_WORKERS,
            compute_scale: float = 1.0) -> list[dict]:
  """Rows of (alg, link, workers, compute, comm, step time, time to target)."""
  rows = []
  for alg, pattern in patterns.items():
    for gbps in links_gbps:
      beta = gbps * 1e9 / 8
      for w in workers:
        tc = compute_s[alg] / compute_scale
        tm = comm_time(alg, pattern, w, alpha, beta)
        rows.append({"algorithm": alg, "link_gbps": gbps, "workers": w,
                     "compute_s": tc, "comm_s": tm, "step_s": tc + tm,
                     "comm_fraction": tm / (tc + tm),
                     "steps_to_target": steps.get(alg),
                     "time_to_target_s": (tc + tm) * steps[alg] if steps.get(alg) else None})
  return rows


# --------------------------------------------------------------------------------------
# Measurement
# --------------------------------------------------------------------------------------

def measure_one(alg: str, workers: int, processes: int, devices: int, steps: int,
                timeout: float) -> dict:
  args = ["--config", "configs/default.py", f"--config.steps={steps}",
          "--config.checkpoint_every=0", "--config.eval_every=0",
          f"--config.log_every={steps}", "--config.optimizer.learning_rate=0.025",
          "--config.optimizer.warmup_steps=2",
          f"--config.comm.workers={workers}"]
  if workers > 1:
    args += ALGORITHMS[alg]
  with tempfile.TemporaryDirectory(prefix="coltrain-scaling-") as tmp:
    workdir = os.path.join(tmp, "w")
    env = {k: v for k, v in os.environ.items() if not k.startswith("COLTRAIN_")}
    env.pop("NPROC", None)
    if processes == 1:
      env.update(JAX_NUM_CPU_DEVICES=str(devices), NPROC=str(max(2 * devices, 2)))
      cmd = [sys.executable, "-m", "launch.train", *args, "--workdir", workdir]
    else:
      env.pop("JAX_NUM_CPU_DEVICES", None)
      cmd = [sys.executable, "-m", "launch.multiprocess", "--processes", str(processes),
             "--devices_per_process", str(devices), "--", *args, "--workdir", workdir]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=timeout, start_new_session=True)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
      raise RuntimeError(f"{alg} W={workers} {processes}x{devices} failed:\n"
                         f"{r.stderr[-3000:]}")
    with open(os.path.join(workdir, "summary.json")) as f:
      s = json.load(f)
  return {"algorithm": alg if workers > 1 else "single", "workers": workers,
          "processes": processes, "devices_per_process": devices, "steps": steps,
          "step_s": 1.0 / s["train_steps_per_second"],
          "bytes_per_worker_per_step": s.get("bytes_sent_per_worker", 0.0) / s["steps"],
          "wall_s": wall, "test_accuracy": s["test_accuracy"]}


def _key(m: dict) -> str:
  return f"{m['algorithm']}/{m['workers']}/{m['processes']}x{m['devices_per_process']}"


# --------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------

def _fmt_s(x: float | None) -> str:
  if x is None:
    return "n/a"
  if x < 1e-3:
    return f"{x * 1e6:.0f} us"
  if x < 1:
    return f"{x * 1e3:.1f} ms"
  if x < 120:
    return f"{x:.1f} s"
  return f"{x / 60:.1f} min"


def _fmt_b(x: float) -> str:
  for unit, f in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
    if x >= f:
      return f"{x / f:.1f} {unit}"
  return f"{x:.0f} B"


def write_report(out: str, measured: list[dict], compute_s: dict, patterns: dict,
                 steps: dict, rows: list[dict], rows_fast: list[dict],
                 compute_scale: float) -> str:
  lines = ["# Scaling report", "",
           "## Measured on this machine (2 CPU cores shared by every process)", "",
           "Default config (LeNet, 496,138 params, global batch 64), steady-state time per "
           "step; W workers = P processes x D simulated devices (x stacked workers per "
           "device). All processes share the same 2 cores, so step time grows with W: "
           "these rows measure overhead and bytes, not speed-up.", "",
           "| algorithm | workers | processes x devices | s/step | vs 1 process, same W | "
           "bytes sent per worker per step |", "| --- | --- | --- | --- | --- | --- |"]
  base = {(m["algorithm"], m["workers"]): m["step_s"] for m in measured
          if m["processes"] == 1 and m["devices_per_process"] == min(
              x["devices_per_process"] for x in measured
              if x["algorithm"] == m["algorithm"] and x["workers"] == m["workers"]
              and x["processes"] == 1)}
  for m in sorted(measured, key=lambda m: (m["algorithm"], m["workers"], m["processes"],
                                           m["devices_per_process"])):
    ref = base.get((m["algorithm"], m["workers"]))
    lines.append(f"| {m['algorithm']} | {m['workers']} | {m['processes']} x "
                 f"{m['devices_per_process']} | {m['step_s']:.3f} | "
                 f"{m['step_s'] / ref:.2f} | {_fmt_b(m['bytes_per_worker_per_step'])} |"
                 if ref else
                 f"| {m['algorithm']} | {m['workers']} | {m['processes']} x "
                 f"{m['devices_per_process']} | {m['step_s']:.3f} | | "
                 f"{_fmt_b(m['bytes_per_worker_per_step'])} |")
  lines += ["", "## Cost model inputs", "",
            "| algorithm | compute per worker-step (measured) | messages per step | "
            "steps to train acc >= %.2f (8 workers, results/comm) |" % TARGET_TRAIN_ACCURACY,
            "| --- | --- | --- | --- |"]
  for alg, p in patterns.items():
    if alg == "allreduce":
      msg = f"1 allreduce of {_fmt_b(p['allreduce_bytes'])}"
    elif alg == "powersgd":
      msg = "2 allreduces of " + " and ".join(_fmt_b(b) for b in p["rounds_bytes"])
    else:
      msg = f"{p['peers']} point-to-point messages of {_fmt_b(p['message_bytes'])}"
    lines.append(f"| {alg} | {_fmt_s(compute_s[alg])} | {msg} | "
                 f"{steps.get(alg) or 'n/a'} |")
  for title, rr, scale in (("measured compute", rows, 1.0),
                           (f"compute {compute_scale:g}x faster (accelerator-class)",
                            rows_fast, compute_scale)):
    lines += ["", f"## Projection, {title}", "",
              f"alpha = {ALPHA_S * 1e6:.0f} us per message; time to target = steps to "
              f"target x step time.", "",
              "| algorithm | link | " + " | ".join(f"W={w}" for w in PROJECT_WORKERS)
              + " | comm share at W=1024 | time to target at W=1024 |",
              "| --- | --- | " + " | ".join("---" for _ in PROJECT_WORKERS) + " | --- | --- |"]
    for alg in patterns:
      for gbps in LINKS_GBPS:
        sel = {r["workers"]: r for r in rr if r["algorithm"] == alg
               and r["link_gbps"] == gbps}
        last = sel[PROJECT_WORKERS[-1]]
        lines.append(f"| {alg} | {gbps:g} Gb/s | "
                     + " | ".join(_fmt_s(sel[w]["step_s"]) for w in PROJECT_WORKERS)
                     + f" | {100 * last['comm_fraction']:.0f} % | "
                     f"{_fmt_s(last['time_to_target_s'])} |")
  text = "\n".join(lines) + "\n"
  with open(os.path.join(out, "scaling.md"), "w") as f:
    f.write(text)
  return text


def plot(out: str, rows: list[dict], rows_fast: list[dict], compute_scale: float) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=False)
  colors = {"allreduce": "tab:blue", "choco": "tab:green", "powersgd": "tab:orange"}
  for ax, rr, title in ((axes[0], rows, "measured CPU compute"),
                        (axes[1], rows_fast, f"compute / {compute_scale:g}")):
    for alg in colors:
      for gbps, style in zip(LINKS_GBPS, ("--", "-")):
        sel = sorted((r["workers"], r["step_s"]) for r in rr
                     if r["algorithm"] == alg and r["link_gbps"] == gbps)
        if sel:
          ax.plot([w for w, _ in sel], [t * 1e3 for _, t in sel], style, marker="o",
                  color=colors[alg], label=f"{alg}, {gbps:g} Gb/s")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("workers")
    ax.set_ylabel("projected time per step (ms)")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
  axes[1].legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(os.path.join(out, "projection.png"), dpi=120)


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--out", default="results/scaling")
  ap.add_argument("--steps", type=int, default=20, help="steps per measured run")
  ap.add_argument("--no-measure", dest="measure", action="store_false")
  ap.add_argument("--remeasure", action="store_true")
  ap.add_argument("--algorithms", default="allreduce,choco,powersgd")
  ap.add_argument("--comm_runs", default="results/comm/runs")
  ap.add_argument("--compute_scale", type=float, default=100.0)
  ap.add_argument("--timeout", type=float, default=900)
  args = ap.parse_args(argv)
  os.makedirs(args.out, exist_ok=True)
  algs = [a for a in args.algorithms.split(",") if a]
  path = os.path.join(args.out, "measured.json")
  measured: list[dict] = []
  if os.path.exists(path) and not args.remeasure:
    with open(path) as f:
      measured = json.load(f)
  if args.measure:
    done = {_key(m) for m in measured}
    # the cost model's inputs (8 workers stacked on one device) first
    plan = ([("single", 1, 1, 1)] + [(a, 8, 1, 1) for a in algs]
            + [(a, *l) for a in algs for l in LAYOUTS[a] if l[0] > 1 and l != (8, 1, 1)])
    for alg, w, p, d in plan:
      key = f"{alg}/{w}/{p}x{d}"
      if key in done:
        continue
      m = measure_one(alg if alg != "single" else "allreduce", w, p, d, args.steps,
                      args.timeout)
      measured.append(m)
      print(f"bench_scaling: {key}: {m['step_s']:.3f} s/step, "
            f"{_fmt_b(m['bytes_per_worker_per_step'])}/worker/step "
            f"({m['wall_s']:.0f} s)", flush=True)
      with open(path + ".tmp", "w") as f:
        json.dump(measured, f, indent=1)
      os.replace(path + ".tmp", path)
  compute_s = {}
  for alg in algs:
    stacked = [m for m in measured if m["algorithm"] == alg and m["workers"] == 8
               and m["processes"] == 1 and m["devices_per_process"] == 1]
    if not stacked:
      raise SystemExit(f"bench_scaling: no measurement of 8 {alg} workers on one device")
    compute_s[alg] = stacked[0]["step_s"] / 8
  patterns = {alg: message_pattern(alg) for alg in algs}
  steps = {alg: steps_to_target(os.path.join(args.comm_runs, COMM_RUNS[alg],
                                             "metrics.jsonl"), TARGET_TRAIN_ACCURACY)
           for alg in algs}
  rows = project(compute_s, patterns, steps)
  rows_fast = project(compute_s, patterns, steps, compute_scale=args.compute_scale)
  with open(os.path.join(args.out, "projection.json"), "w") as f:
    json.dump({"alpha_s": ALPHA_S, "links_gbps": LINKS_GBPS,
               "target_train_accuracy": TARGET_TRAIN_ACCURACY, "compute_s": compute_s,
               "patterns": patterns, "steps_to_target": steps,
               "compute_scale": args.compute_scale, "rows": rows,
               "rows_fast_compute": rows_fast}, f, indent=1)
  print(write_report(args.out, measured, compute_s, patterns, steps, rows, rows_fast,
                     args.compute_scale))
  plot(args.out, rows, rows_fast, args.compute_scale)
  return 0


if __name__ == "__main__":
  sys.exit(main())
