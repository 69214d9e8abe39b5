"""Request encoding: KServe v2 JSON numbers vs binary tensor data, same server, same run.

  python -m launch.bench_encoding [--rounds 3] [--duration 6] [--rate 1500] \
      [--out results/frontend/encoding.json]

One `launch.serve` server (the default serving config, training off, the device/host
core split of the co-location benchmark) is driven by `launch.loadgen` in open loop
(Poisson arrivals at `--rate` requests/s, one MNIST digit per request) alternately with
JSON bodies (784 FP32 numbers) and with binary bodies (`--binary`: a JSON header and
784 UINT8 bytes); responses are JSON in both. Per run: median and p99 latency, and the
HTTP front-end process's CPU seconds (user + system, /proc) per request served (it
parses the bodies; the load generator shares its cores). The summary gives the medians
over `--rounds` and the ratios binary / JSON, measured in the same run so machine
noise affects both. (An open loop at a fixed rate: in a closed loop the arrival pattern
itself changes with the front end's speed, and with it the batch sizes.)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np

from launch.bench_frontend import _cpu_seconds
from launch.colocate_bench import ServeProcess, run_loadgen, split_cpus, write_images


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--rounds", type=int, default=3)
  p.add_argument("--duration", type=float, default=6.0)
  p.add_argument("--rate", type=float, default=1500.0)
  p.add_argument("--out", default=None)
  a = p.parse_args(argv)
  work = tempfile.mkdtemp(prefix="encoding_")
  images = os.path.join(work, "mnist_test.npz")
  write_images(images)
  device_cpus, host_cpus = split_cpus("auto")
  server = ServeProcess("E", work, ["--config.serve.model_name=lenet",
                                    f"--config.serve.device_cpus={device_cpus}",
                                    "--config.serve.train=False",
                                    "--config.serve.slo_ms=1000"])
  runs = {"json": [], "binary": []}
  try:
    server.wait_ready()
    front_end = server.child_pids()[0]
    common = ["--model", "lenet", "--images", images, "--mode", "open",
              "--rate", str(a.rate), "--duration", str(a.duration)]
    if device_cpus:
      common += ["--cpus", ",".join(map(str, sorted(host_cpus)))]
    for r in range(a.rounds):
      for kind in (("json", "binary") if r % 2 == 0 else ("binary", "json")):
        c0 = _cpu_seconds(front_end)
        out = run_loadgen(server.url, common + (["--binary"] if kind == "binary" else []),
                          a.duration + 120)
        cpu = _cpu_seconds(front_end) - c0
        served = out["codes"].get("200", 0)
        rec = {"rps": out["throughput_rps"], "shed_fraction": out["shed_fraction"],
               "p50_ms": out["latency_ms"]["p50"],
               "p99_ms": out["latency_ms"]["p99"], "served": served,
               "frontend_cpu_us_per_request": 1e6 * cpu / max(served, 1)}
        runs[kind].append(rec)
        print(f"bench_encoding: {kind:6s} {rec['rps']:7.0f} req/s, p50 {rec['p50_ms']:.2f} "
              f"ms, front end {rec['frontend_cpu_us_per_request']:.0f} us CPU/request",
              file=sys.stderr, flush=True)
        time.sleep(0.5)
  finally:
    server.stop()
  med = {k: {m: float(np.median([r[m] for r in v])) for m in v[0]} for k, v in runs.items()}
  summary = {"median": med, "ratio_binary_over_json": {
      m: med["binary"][m] / med["json"][m] for m in
      ("p50_ms", "p99_ms", "frontend_cpu_us_per_request")}}
  result = {"runs": runs, "summary": summary, "args": vars(a),
            "device_cpus": device_cpus, "host_cpus": sorted(host_cpus)}
  text = json.dumps(result, indent=1)
  if a.out:
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    with open(a.out, "w") as f:
      f.write(text)
  print(json.dumps(summary))
  return 0


if __name__ == "__main__":
  sys.exit(main())
