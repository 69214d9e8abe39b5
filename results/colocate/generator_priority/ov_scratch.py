"""The scratch script behind this folder's two files (kept as a record; not a tool).

Overload points on D (training on) against one server at fixed rates, rounds in
alternating order, 12 s windows, SLO 10.5 ms, the device on the last core:

  python results/colocate/generator_priority/ov_scratch.py 6500,8000 0,-10 2 12 10.5 OUT

varies the load generator's niceness (`overload_nice_0_vs_-10.json`, 64 connections,
the default then). For `overload_connections_64_vs_256.json` the same ran with every
generator at `--nice -10` and `--connections` 64 vs 256 in place of the niceness.
"""
import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))))
sys.path.insert(0, ROOT)
from launch import colocate_bench as cb  # noqa: E402

rates = [float(r) for r in sys.argv[1].split(",")]
nices = [int(n) for n in sys.argv[2].split(",")]
rounds = int(sys.argv[3]); seconds = float(sys.argv[4]); slo = float(sys.argv[5])
work = tempfile.mkdtemp(prefix="ov_")
images = os.path.join(work, "mnist.npz"); cb.write_images(images)
dev, host = cb.split_cpus("auto")
common = ["--config.serve.model_name=lenet", f"--config.serve.device_cpus={dev}",
          f"--config.serve.slo_ms={slo}"]
lg = ["--model", "lenet", "--images", images, "--binary", "--connections", "64",
      "--cpus", ",".join(map(str, sorted(host)))]
S = cb.ServeProcess("S", work, common); S.wait_ready()
poll = cb.Poller({"S": S}, cpus=host).start()
rows = []
try:
  for rd in range(rounds):
    for rate in rates:
      for nice in (nices if rd % 2 == 0 else nices[::-1]):
        def run_lg(url, args, timeout, nice=nice):
          cmd = [sys.executable, "-m", "launch.loadgen", "--url", url, *args]
          out = subprocess.run(cmd, cwd=cb.REPO, capture_output=True, text=True,
                               timeout=timeout,
                               preexec_fn=lambda: os.setpriority(os.PRIO_PROCESS, 0, nice))
          return json.loads(out.stdout.strip().splitlines()[-1])
        cb.run_loadgen = run_lg
        r, m = cb.load_window(S, poll, "D", lg + [
            "--mode", "open", "--rate", str(rate), "--arrival", "poisson",
            "--duration", str(seconds), "--slo_ms", str(slo), "--seed", str(rd)], seconds)
        row = {"round": rd, "rate": rate, "loadgen_nice": nice, "connections": 64,
               "att": r["slo_attainment"], "adm": r["slo_attainment_admitted"],
               "adm_send": r["slo_attainment_admitted_from_send"],
               "shed": r["shed_fraction"], "late_p99": r["dispatch_late_ms"]["p99"],
               "p99": r["latency_ms"]["p99"], "train": m.get("train_samples_per_s")}
        rows.append(row); print(json.dumps(row), flush=True)
finally:
  poll.stop(); S.stop()
json.dump(rows, open(sys.argv[6], "w"), indent=1)
