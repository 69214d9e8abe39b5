"""Load generator (launch.loadgen) and benchmark bookkeeping (launch.colocate_bench)."""

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

from launch import colocate_bench, loadgen


@pytest.mark.parametrize("arrival,cv", [("poisson", 1.0), ("gamma", 2.0)])
def test_arrival_processes_have_the_requested_rate_and_burstiness(arrival, cv):
  t = loadgen.arrival_times(500.0, 200.0, arrival, 2.0, seed=1)
  gaps = np.diff(t)
  assert t[0] >= 0 and t[-1] < 200.0 and np.all(gaps >= 0)
  assert len(t) / 200.0 == pytest.approx(500.0, rel=0.03)
  assert gaps.std() / gaps.mean() == pytest.approx(cv, rel=0.08)


def test_bad_arrival_arguments_are_errors():
  with pytest.raises(ValueError, match="unknown arrival"):
    loadgen.arrival_times(10, 1, "uniform", 1, 0)
  with pytest.raises(ValueError, match="> 0"):
    loadgen.arrival_times(0, 1, "poisson", 1, 0)
  with pytest.raises(SystemExit):
    loadgen.main(["--url", "http://127.0.0.1:1", "--mode", "open"])  # no rate


class _Slow(BaseHTTPRequestHandler):
  protocol_version = "HTTP/1.1"
  delay = 0.03

  def do_POST(self):  # noqa: N802
    self.rfile.read(int(self.headers["Content-Length"]))
    time.sleep(self.delay)
    body = json.dumps({"model_version": "3", "outputs": [
        {"name": "logits", "data": [0.0] * 10}, {"name": "label", "data": [7]}]}).encode()
    self.send_response(200)
    self.send_header("Content-Length", str(len(body)))
    self.end_headers()
    self.wfile.write(body)

  def log_message(self, *a):
    pass


def test_open_loop_charges_waiting_to_the_request_and_never_skips_arrivals():
  httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Slow)
  threading.Thread(target=httpd.serve_forever, daemon=True).start()
  try:
    gen = loadgen.LoadGen(f"http://127.0.0.1:{httpd.server_address[1]}", "m",
                          [b"{}"], labels=[[7]])
    offsets = np.arange(6) * 0.001          # 6 arrivals within 5 ms, ONE connection
    res = gen.open_loop(offsets, connections=1)
  finally:
    httpd.shutdown()
    httpd.server_close()
  lat = res["latency"]
  assert len(lat) == 6 and all(r[0] == 200 for r in res["recs"])
  # request k waits for the k earlier ones (>= 30 ms each): latency counts from its
  # scheduled arrival, not from when a connection became free
  for k in range(6):
    assert lat[k] >= (k + 1) * 0.03 - offsets[k] - 1e-3
  s = loadgen.summarize(res, slo_ms=1e6, images_per_request=1, labels=True)
  assert s["requests"] == 6 and s["codes"] == {"200": 6} and s["accuracy"] == 1.0
  assert s["slo_attainment"] == 1.0 and s["versions"]["max"] == 3
  s = loadgen.summarize(res, slo_ms=1.0, images_per_request=1, labels=True)
  assert s["slo_attainment"] == 0.0


def test_summary_counts_shed_and_failed_requests_as_slo_misses():
  res = {"latency": np.array([0.001, 0.002, 0.001, np.nan]),
         "recs": [[200, 1, 0], [200, 2, 0], [503, -1, 0], [-1, -1, 0]], "wall": 1.0}
  s = loadgen.summarize(res, slo_ms=1.5, images_per_request=1, labels=False)
  assert s["slo_attainment"] == 0.25 and s["slo_attainment_admitted"] == 0.5
  assert s["shed_fraction"] == 0.25 and s["codes"] == {"-1": 1, "200": 2, "503": 1}


def _point(cfg, rho, p99, train, busy=0.2, att=1.0):
  return {"config": cfg, "rho": rho, "arrival": "poisson", "slo_attainment": att,
          "latency_ms": {"p99": p99}, "train_samples_per_s": train,
          "inference_busy_fraction": busy, "shed_fraction": 0.0}


def test_benchmark_summary_formulas(tmp_path):
  results = {"B": {"train_samples_per_s": 100.0}, "slo_ms": 10.0,
             "capacity": {"rps": 500.0},
             "points": [_point("A", 0.5, 4.0, 0.0, busy=0.5), _point("C", 0.5, 8.0, 30.0),
                        _point("D", 0.5, 5.0, 40.0, att=0.995)],
             "overload": [], "conditions": {"loadavg": []}}
  summary = colocate_bench.summarize(results)
  d = next(s for s in summary if s["config"] == "D")
  c = next(s for s in summary if s["config"] == "C")
  assert d["p99_inflation"] == pytest.approx(1.25) and c["p99_inflation"] == pytest.approx(2.0)
  assert d["retention"] == pytest.approx(0.4) and d["U"] == 0.5
  assert d["harvest_efficiency"] == pytest.approx(0.8)
  assert c["harvest_efficiency"] == pytest.approx(0.6) and d["slo_attainment"] == 0.995
  results["summary"] = summary
  colocate_bench.write_table(results, str(tmp_path / "t.md"))
  text = (tmp_path / "t.md").read_text()
  assert "| poisson | 0.5 | D | 0.9950 | 5.00 | 4.00 | 1.25 | 0.400 | 0.500 | 0.800 |" in text
  colocate_bench.plot(results, str(tmp_path / "p.png"))
  assert (tmp_path / "p.png").stat().st_size > 1000


def test_malformed_request_set_covers_many_kinds():
  bodies = colocate_bench.malformed_bodies(1000)
  assert len(bodies) == 1000 and len({b for _, b in bodies}) > 100
