"""The scratch script behind two files of this folder (kept as a record; not a tool).

One server (D: training on; the device on the last core, the generator at niceness
-10 on the others), fixed Poisson rates, SLO 10 ms (a bound of the server's latency
histogram): per window, the client's admitted attainment against the share of served
requests the server itself wrote within 10 ms of its arrival estimate
(`coltrain_request_seconds`), and the admission gauges read every 0.25 s.

  python results/colocate/ab_late_quantile/diag_scratch.py RATES ROUNDS SECONDS D OUT

`server_vs_client.json`: `7000 2 12 D` on 9b3613c (before the late quantile and its
gauges, so an earlier copy without `reserve_ms`/`headroom_ms`); `reserve_gauges.json`:
`3300,4250,7000 1 12 D` on 034073a's serving code.
"""
import json, os, sys, tempfile, time
sys.path.insert(0, os.getcwd())
from launch import colocate_bench as cb
rates = [float(r) for r in sys.argv[1].split(",")]
rounds = int(sys.argv[2]); seconds = float(sys.argv[3]); cfg = sys.argv[4]
out = sys.argv[5]
slo = float(os.environ.get("SLO", "10.0"))
work = tempfile.mkdtemp(prefix="ovd_")
images = os.path.join(work, "mnist.npz"); cb.write_images(images)
dev, host = cb.split_cpus("auto")
common = ["--config.serve.model_name=lenet", f"--config.serve.device_cpus={dev}",
          f"--config.serve.slo_ms={slo}"] + sys.argv[6:]
lg = ["--model", "lenet", "--images", images, "--binary", "--nice", "-10",
      "--cpus", ",".join(map(str, sorted(host)))]
S = cb.ServeProcess("S", work, common); S.wait_ready()
poll = cb.Poller({"S": S}, cpus=host).start()
K = "coltrain_request_seconds_bucket"
def hist(m):
  return {k: v for k, v in m.items() if k.startswith(K)}
rows = []
try:
  for rd in range(rounds):
    for rate in rates:
      h0 = hist(S.metrics())
      import threading
      gauges, stop = [], threading.Event()
      def watch():
        while not stop.wait(0.25):
          m_ = S.metrics()
          gauges.append((m_.get("coltrain_admission_late_reserve_seconds", -1),
                         m_.get("coltrain_admission_headroom_seconds", -1)))
      th = threading.Thread(target=watch, daemon=True); th.start()
      r, m = cb.load_window(S, poll, cfg, lg + ["--mode", "open", "--rate", str(rate),
          "--arrival", "poisson", "--duration", str(seconds), "--slo_ms", str(slo),
          "--seed", str(rd)], seconds)
      stop.set(); th.join()
      h1 = hist(S.metrics())
      d = {k: h1[k] - h0.get(k, 0) for k in h1}
      tot = d[K + '{le="+Inf"}']
      le = lambda b: d[K + '{le="%s"}' % b] / tot
      row = {"round": rd, "rate": rate, "adm": r["slo_attainment_admitted"],
             "adm_send": r["slo_attainment_admitted_from_send"], "shed": r["shed_fraction"],
             "server_le10": le("0.01"), "server_le15": le("0.015"), "server_le7.5": le("0.0075"),
             "late_p99": r["dispatch_late_ms"]["p99"], "p99": r["latency_ms"]["p99"],
             "tail": r["latency_breakdown_ms"]["tail"], "thread": m["device_thread"],
             "reserve_ms": [round(1e3 * g[0], 2) for g in gauges],
             "headroom_ms": [round(1e3 * g[1], 2) for g in gauges]}
      rows.append(row); print(json.dumps(row), flush=True)
finally:
  poll.stop(); S.stop()
json.dump(rows, open(out, "w"), indent=1)
