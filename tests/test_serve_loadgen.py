"""Load generator (launch.loadgen) and benchmark bookkeeping (launch.colocate_bench)."""

import contextlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

from launch import colocate_bench, loadgen

pytestmark = pytest.mark.serial   # wall-clock timing: runs alone (pyproject's `serial`)


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


class _Handler(BaseHTTPRequestHandler):
  """A quiet HTTP/1.1 test server handler; `reply` answers 200 with a body."""
  protocol_version = "HTTP/1.1"

  def reply(self, body: bytes, close: bool = False) -> None:
    self.send_response(200)
    self.send_header("Content-Length", str(len(body)))
    if close:
      self.send_header("Connection", "close")
      self.close_connection = True
    self.end_headers()
    self.wfile.write(body)

  def log_message(self, *a):
    pass


class _Slow(_Handler):
  delay = 0.03

  def do_POST(self):  # noqa: N802
    self.rfile.read(int(self.headers["Content-Length"]))
    time.sleep(self.delay)
    self.reply(json.dumps({"model_version": "3", "outputs": [
        {"name": "logits", "data": [0.0] * 10}, {"name": "label", "data": [7]}]}).encode())


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


def test_latency_breakdown_splits_the_tail_into_server_queue_compute_and_rest():
  # 200 served requests: 198 at 2 ms (0.5 queued, 0.3 compute), two slow ones at 20 ms
  # (15 queued in the server, 1 compute, sent 0.5 ms late); one shed, one without
  # server timings (left out)
  n = 202
  lat = np.full(n, 0.002)
  server = np.tile([0.5, 0.3], (n, 1))
  late = np.zeros(n)
  lat[[10, 20]], server[[10, 20]], late[[10, 20]] = 0.020, [15.0, 1.0], 0.0005
  server[200] = np.nan
  recs = [[200, 1, 0]] * n
  recs[201] = [503, -1, 0]
  lat[201] = np.nan
  res = {"latency": lat, "recs": recs, "wall": 1.0, "server_ms": server, "late": late}
  b = loadgen.summarize(res, slo_ms=5.0, images_per_request=1,
                        labels=False)["latency_breakdown_ms"]
  assert b["all"]["requests"] == 200 and b["tail"]["requests"] == 2
  assert b["tail"]["latency"] == pytest.approx(20.0)
  assert b["tail"]["server_queue"] == 15.0 and b["tail"]["compute"] == 1.0
  assert b["tail"]["rest"] == pytest.approx(4.0) and b["tail"]["dispatch_late"] == 0.5
  assert b["all"]["latency"] == pytest.approx((198 * 2 + 2 * 20) / 200)
  assert b["all"]["server_queue"] == pytest.approx((198 * 0.5 + 2 * 15) / 200)
  # a server that reports no timings: no breakdown
  res["server_ms"] = np.full((n, 2), np.nan)
  assert loadgen.summarize(res, slo_ms=5.0, images_per_request=1,
                           labels=False)["latency_breakdown_ms"] == {}


def test_server_timings_are_decoded_from_the_response_parameters():
  gen = loadgen.LoadGen("http://127.0.0.1:1", "m", [b"{}"])
  body = json.dumps({"model_version": 3, "parameters": {"queue_ms": 1.5,
                                                         "compute_ms": 0.25}}).encode()
  assert gen.decode(0, 200, body) == ([200, 3, 0], (1.5, 0.25))
  rec, timing = gen.decode(0, 200, b'{"model_version": 3}')
  assert rec == [200, 3, 0] and all(np.isnan(timing))
  assert np.isnan(gen.decode(0, 503, body)[1][0])


@contextlib.contextmanager
def _serving(handler):
  """A threaded stdlib HTTP server with `handler`; yields its URL."""
  httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
  httpd.accepted = 0
  get_request = httpd.get_request

  def counting_get_request():
    httpd.accepted += 1
    return get_request()

  httpd.get_request = counting_get_request
  threading.Thread(target=httpd.serve_forever, daemon=True).start()
  try:
    yield f"http://127.0.0.1:{httpd.server_address[1]}", httpd
  finally:
    httpd.shutdown()
    httpd.server_close()


class _Echo(_Handler):
  """Answers body {"k": K} with label [K, K + 1] and model version 5 (keep-alive)."""
  close_each = False  # answer with `Connection: close` and hang up

  def do_POST(self):  # noqa: N802
    if self.headers["Content-Type"] != "application/json":
      self.send_error(415)
      return
    k = json.loads(self.rfile.read(int(self.headers["Content-Length"])))["k"]
    self.reply(json.dumps({"model_version": "5", "outputs": [
        {"name": "logits", "data": [0.0] * 10},
        {"name": "label", "data": [k, k + 1]}]}).encode(), close=self.close_each)


class _EchoClosing(_Echo):
  close_each = True


class _EchoHttp10(_Echo):
  """HTTP/1.0 without Content-Length: the body ends where the connection does."""
  protocol_version = "HTTP/1.0"

  def send_header(self, key, value):
    if key != "Content-Length":
      super().send_header(key, value)


def _echo_bodies(n):
  return [json.dumps({"k": k}).encode() for k in range(n)]


def test_versions_and_accuracy_are_decoded_per_request():
  # label lists: body k is answered [k, k+1]; want 2, 1 and 0 of them right
  labels = [[0, 1], [1, 0], [9, 9]]
  with _serving(_Echo) as (url, _):
    gen = loadgen.LoadGen(url, "m", _echo_bodies(3), labels=labels)
    res = gen.open_loop(np.arange(6) * 0.002, connections=2)
    closed = gen.closed_loop(2, 60.0, max_requests=6)   # a count, not a time: no flake
    seq = gen.sequential(4)
  assert res["recs"] == [[200, 5, 2], [200, 5, 1], [200, 5, 0]] * 2
  s = loadgen.summarize(res, slo_ms=None, images_per_request=2, labels=True)
  assert s["accuracy"] == 0.5 and s["versions"] == {"min": 5, "max": 5, "distinct": 1}
  assert len(closed["recs"]) == 6 and all(r[:2] == [200, 5] for r in closed["recs"])
  assert np.all(closed["latency"] > 0)
  assert [r[2] for r in seq["recs"]] == [2, 1, 0, 2] and len(seq["latency"]) == 4


def test_unreadable_200_body_is_counted_without_version_or_labels():
  gen = loadgen.LoadGen("http://127.0.0.1:1", "m", [b"{}"], labels=[[7]])
  assert gen.record(0, 200, b"not json") == [200, -1, 0]
  assert gen.record(0, 200, b'{"model_version": "4"}') == [200, 4, 0]
  assert gen.record(0, 503, b'{"error": "busy"}') == [503, -1, 0]


@pytest.mark.parametrize("handler", [_EchoClosing, _EchoHttp10])
def test_connections_closed_by_the_server_are_reopened(handler):
  with _serving(handler) as (url, httpd):
    gen = loadgen.LoadGen(url, "m", _echo_bodies(2), labels=[[0, 1], [1, 2]])
    res = gen.open_loop(np.arange(5) * 0.002, connections=1)
    closed = gen.closed_loop(1, 60.0, max_requests=3)
  assert res["recs"] == [[200, 5, 2]] * 5 and not np.any(np.isnan(res["latency"]))
  assert len(closed["recs"]) == 3 and all(r == [200, 5, 2] for r in closed["recs"])
  assert httpd.accepted == 5 + len(closed["recs"])  # one connection per request


class _DropsOddRequests(_Handler):
  """Reads every request; answers the even-numbered ones, hangs up on the others."""
  count = 0
  lock = threading.Lock()

  def do_POST(self):  # noqa: N802
    self.rfile.read(int(self.headers["Content-Length"]))
    with self.lock:
      k, type(self).count = type(self).count, type(self).count + 1
    if k % 2:
      self.close_connection = True  # no response: the connection just closes
      return
    self.reply(b'{"model_version": "1", "outputs": [{}, {"data": [0]}]}')


def test_dropped_connections_fail_the_request_and_are_reopened():
  with _serving(_DropsOddRequests) as (url, httpd):
    gen = loadgen.LoadGen(url, "m", [b"{}"])
    res = gen.open_loop(np.arange(8) * 0.001, connections=1)  # one connection: in order
  assert [r[0] for r in res["recs"]] == [200, -1] * 4       # none skipped, none hung
  assert np.all(np.isnan(res["latency"][1::2])) and np.all(res["latency"][::2] > 0)
  assert httpd.accepted == 4  # a fresh connection after each drop
  s = loadgen.summarize(res, slo_ms=1e6, images_per_request=1, labels=False)
  assert s["codes"] == {"-1": 4, "200": 4} and s["slo_attainment"] == 0.5


def test_refused_connections_are_failures_not_hangs():
  with socket.socket() as s:  # a port nobody listens on
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  gen = loadgen.LoadGen(f"http://127.0.0.1:{port}", "m", [b"{}"], timeout=5.0)
  res = gen.open_loop(np.arange(4) * 0.001, connections=2)
  assert [r[0] for r in res["recs"]] == [-1] * 4 and np.all(np.isnan(res["latency"]))
  assert [r[0] for r in gen.sequential(3)["recs"]] == [-1] * 3


def test_unreadable_responses_fail_the_request_without_waiting_for_the_timeout():
  listener = socket.create_server(("127.0.0.1", 0))
  held = []

  def serve():  # answers every request with a non-HTTP head and keeps the socket open
    while True:
      try:
        conn, _ = listener.accept()
      except OSError:
        return
      held.append(conn)
      conn.recv(65536)
      conn.sendall(b"NOT HTTP AT ALL\r\n\r\n")

  threading.Thread(target=serve, daemon=True).start()
  try:
    gen = loadgen.LoadGen(f"http://127.0.0.1:{listener.getsockname()[1]}", "m", [b"{}"],
                          timeout=30.0)
    res = gen.open_loop(np.arange(3) * 0.001, connections=1)
  finally:
    listener.close()
    for conn in held:
      conn.close()
  assert [r[0] for r in res["recs"]] == [-1] * 3 and len(held) == 3
  assert res["wall"] < 15.0  # failed on reading, long before the 30 s timeout


class _Silent(_Handler):
  def do_POST(self):  # noqa: N802
    self.rfile.read(int(self.headers["Content-Length"]))
    time.sleep(1.5)  # never answers in time


def test_requests_time_out_with_status_minus_one():
  with _serving(_Silent) as (url, _):
    gen = loadgen.LoadGen(url, "m", [b"{}"], timeout=0.3)
    res = gen.open_loop(np.array([0.0, 0.01]), connections=4)
  assert [r[0] for r in res["recs"]] == [-1, -1] and np.all(np.isnan(res["latency"]))
  assert res["wall"] >= 0.3 + 0.01


class _Fast(_Slow):
  delay = 0.0


def test_main_writes_the_summary(tmp_path, capsys):
  with _serving(_Fast) as (url, _):
    assert loadgen.main(["--url", url, "--mode", "sequential", "--requests", "3",
                         "--out", str(tmp_path / "o.json")]) == 0
  out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert out == json.loads((tmp_path / "o.json").read_text())
  assert out["requests"] == 3 and out["args"]["mode"] == "sequential"
  assert out["codes"] == {"200": 3} and out["versions"]["max"] == 3


def test_open_loop_raw_record_round_trips_and_merged_runs_summarize_as_one(tmp_path):
  with _serving(_Fast) as (url, _):
    assert loadgen.main(["--url", url, "--rate", "200", "--duration", "0.1", "--slo_ms",
                         "1000", "--raw_out", str(tmp_path / "r.npz")]) == 0
  run = loadgen.load_raw(str(tmp_path / "r.npz"))
  n = len(run["recs"])
  assert n > 5 and run["latency"].shape == (n,) and run["server_ms"].shape == (n, 2)
  assert all(r[0] == 200 for r in run["recs"]) and run["wall"] > 0
  with pytest.raises(SystemExit):               # the record is of open-loop runs only
    loadgen.main(["--url", url, "--mode", "closed", "--raw_out", str(tmp_path / "x.npz")])
  # two runs merged: their requests together, their walls summed, one window
  nan2 = np.full((2, 2), np.nan)
  one = {"latency": np.array([0.001, 0.003]), "recs": [[200, 1, 1], [200, 1, 0]],
         "late": np.array([0.0, 0.001]), "server_ms": nan2, "wall": 2.0,
         "window_unix": [100.0, 102.0]}
  two = {"latency": np.array([0.002, np.nan]), "recs": [[200, 2, 1], [503, -1, 0]],
         "late": np.array([0.0, 0.0]), "server_ms": nan2, "wall": 1.0,
         "window_unix": [110.0, 111.0]}
  loadgen.save_raw(one, str(tmp_path / "one.npz"))
  back = loadgen.load_raw(str(tmp_path / "one.npz"))
  np.testing.assert_array_equal(back["latency"], one["latency"])
  assert back["recs"] == one["recs"] and back["window_unix"] == [100.0, 102.0]
  both = loadgen.merge_raw([back, two])
  s = loadgen.summarize(both, slo_ms=2.5, images_per_request=1, labels=True)
  assert s["requests"] == 4 and s["codes"] == {"200": 3, "503": 1}
  assert s["slo_attainment"] == 0.5 and s["slo_attainment_admitted"] == pytest.approx(2 / 3)
  # counted from the actual send, the 3 ms request sent 1 ms late took 2 ms: within
  assert s["slo_attainment_admitted_from_send"] == 1.0
  assert s["throughput_rps"] == pytest.approx(1.0) and s["window_unix"] == [100.0, 111.0]
  assert s["accuracy"] == pytest.approx(2 / 3) and s["versions"]["distinct"] == 2
  with pytest.raises(ValueError):
    loadgen.merge_raw([])


def test_cpus_are_parsed_and_validated(capsys):
  assert loadgen.parse_cpus("0") == {0}
  n = os.cpu_count()
  assert loadgen.parse_cpus(f"0-{n - 1}") == set(range(n))
  for bad in ("", "a", "0,x", "-1", "3-1", str(n), f"0,{n + 5}"):
    with pytest.raises(ValueError, match="--cpus"):
      loadgen.parse_cpus(bad)
  with pytest.raises(SystemExit):
    loadgen.main(["--url", "http://127.0.0.1:1", "--mode", "sequential", "--cpus", str(n)])
  assert "no CPU" in capsys.readouterr().err


def test_cpus_pins_the_process():
  before = os.sched_getaffinity(0)
  cpu = min(before)
  try:
    assert loadgen.pin_cpus(str(cpu)) == {cpu}
    assert os.sched_getaffinity(0) == {cpu}
  finally:
    os.sched_setaffinity(0, before)


def test_nice_runs_the_generator_at_that_niceness_and_the_summary_records_it():
  want = min(os.getpriority(os.PRIO_PROCESS, 0) + 3, 19)   # lowering priority: always allowed
  with _serving(_Fast) as (url, _):
    out = subprocess.run([sys.executable, "-m", "launch.loadgen", "--url", url, "--mode",
                          "sequential", "--requests", "2", "--nice", str(want)],
                         cwd=colocate_bench.REPO, capture_output=True, text=True, timeout=60)
  assert out.returncode == 0, out.stderr
  summary = json.loads(out.stdout.strip().splitlines()[-1])
  assert summary["niceness"] == want and summary["codes"] == {"200": 2}


def test_a_refused_or_impossible_niceness_is_a_clear_error(monkeypatch, capsys):
  with pytest.raises(ValueError, match="-20..19"):
    loadgen.set_niceness(20)

  def refuse(*_):
    raise PermissionError(1, "Operation not permitted")

  monkeypatch.setattr(os, "setpriority", refuse)
  with pytest.raises(ValueError, match="not permitted .* needs root, CAP_SYS_NICE"):
    loadgen.set_niceness(-10)
  with pytest.raises(SystemExit):
    loadgen.main(["--url", "http://127.0.0.1:1", "--mode", "sequential", "--nice", "-10"])
  assert "--nice -10: not permitted" in capsys.readouterr().err


def test_generator_priority_puts_the_generators_ahead_of_the_servers():
  base = os.getpriority(os.PRIO_PROCESS, 0)
  steps = colocate_bench.PRIORITY_STEPS
  gp = colocate_bench.generator_priority
  ahead = gp("auto", permitted=lambda: True)
  assert ahead == {"mode": "loadgen", "loadgen_nice": max(base - steps, -20),
                   "server_nice": None}
  assert colocate_bench.priority_args(ahead) == ["--nice", str(max(base - steps, -20))]
  behind = gp("auto", permitted=lambda: False)    # without the privilege: the servers yield
  assert behind == {"mode": "server", "loadgen_nice": None,
                    "server_nice": min(base + steps, 19)}
  assert colocate_bench.priority_args(behind) == []
  assert gp("server", permitted=lambda: True) == behind
  assert gp("none", permitted=lambda: True) == {"mode": "none", "loadgen_nice": None,
                                                "server_nice": None}
  with pytest.raises(ValueError, match="may not raise"):
    gp("loadgen", permitted=lambda: False)
  with pytest.raises(ValueError, match="must be auto"):
    gp("fast", permitted=lambda: True)
  assert colocate_bench.may_raise_priority(0)     # the same niceness: always allowed
  if os.geteuid() == 0:
    assert colocate_bench.may_raise_priority()
  line = colocate_bench.priority_line   # results.md's first line says which was used
  assert line({"conditions": {"priority": ahead}}) == \
      f"; load generators at niceness {max(base - steps, -20)}"
  assert line({"conditions": {"priority": behind}}) == \
      f"; servers at niceness {min(base + steps, 19)}"
  assert line({"conditions": {}}) == ""       # a run from before the option
  with pytest.raises(ValueError, match="only from a process at"):
    colocate_bench.ServeProcess("x", "/nonexistent", [], nice=base - 1)


def _point(cfg, rho, p99, train, busy=0.2, att=1.0, device_busy=None):
  return {"config": cfg, "rho": rho, "arrival": "poisson", "slo_attainment": att,
          "latency_ms": {"p99": p99}, "train_samples_per_s": train,
          "inference_busy_fraction": busy, "device_busy_fraction": device_busy,
          "shed_fraction": 0.0}


def test_benchmark_summary_formulas(tmp_path):
  results = {"B": {"train_samples_per_s": 100.0}, "slo_ms": 10.0,
             "capacity": {"rps": 500.0},
             "points": [_point("A", 0.5, 4.0, 0.0, busy=0.5, device_busy=0.6),
                        _point("C", 0.5, 8.0, 30.0),
                        _point("D", 0.5, 5.0, 40.0, att=0.995)],
             "overload": [], "conditions": {"loadavg": []}}
  summary = colocate_bench.summarize(results)
  d = next(s for s in summary if s["config"] == "D")
  c = next(s for s in summary if s["config"] == "C")
  assert d["p99_inflation"] == pytest.approx(1.25) and c["p99_inflation"] == pytest.approx(2.0)
  assert d["retention"] == pytest.approx(0.4) and d["U"] == 0.5
  assert d["harvest_efficiency"] == pytest.approx(0.8)
  assert c["harvest_efficiency"] == pytest.approx(0.6) and d["slo_attainment"] == 0.995
  # against the device cores' idle fraction (1 - 0.6) instead of (1 - U)
  assert d["U_device"] == 0.6 and d["harvest_efficiency_device"] == pytest.approx(1.0)
  # training at B's speed on exactly A's idle device cycles, against U; D's own U
  assert d["harvest_from_idle"] == pytest.approx(0.8) and d["B_samples_per_s"] == 100.0
  assert d["U_own"] == 0.2
  results["summary"] = summary
  colocate_bench.write_table(results, str(tmp_path / "t.md"))
  text = (tmp_path / "t.md").read_text()
  assert ("| poisson | 0.5 | D | 0.9950 | 5.00 | 4.00 | 1.25 | 100 | 0.400 | 0.500 | 0.800 |"
          " 0.600 | 1.000 | 0.800 | 0.200 |") in text
  # the tail breakdown of A's and D's Poisson points, when the generator reported one
  tail = {"requests": 3, "latency": 9.0, "dispatch_late": 0.5, "server_queue": 4.0,
          "compute": 2.0, "rest": 3.0}
  results["points"][2]["latency_breakdown_ms"] = {"all": {}, "tail": tail}
  colocate_bench.write_table(results, str(tmp_path / "t.md"))
  assert "| 0.5 | D | 9.00 | 0.50 | 4.00 | 2.00 | 3.00 |" in (tmp_path / "t.md").read_text()
  # B measured in each rho's round: that round's points are compared with it
  results["B"]["runs"] = [{"tag": "before", "train_samples_per_s": 90.0},
                          {"tag": "rho=0.5", "rho": 0.5, "train_samples_per_s": 80.0}]
  d = next(s for s in colocate_bench.summarize(results) if s["config"] == "D")
  assert d["B_samples_per_s"] == 80.0 and d["retention"] == pytest.approx(0.5)
  assert d["harvest_efficiency"] == pytest.approx(1.0)
  colocate_bench.plot(results, str(tmp_path / "p.png"))
  assert (tmp_path / "p.png").stat().st_size > 1000


def test_render_only_recomputes_summary_table_and_plot_from_raw_points(tmp_path):
  out = tmp_path / "results.json"
  raw = {"B": {"train_samples_per_s": 100.0}, "slo_ms": 10.0, "capacity": {"rps": 500.0},
         "points": [_point("A", 0.5, 4.0, 0.0, busy=0.5, device_busy=0.6),
                    _point("C", 0.5, 8.0, 30.0), _point("D", 0.5, 5.0, 40.0)],
         "overload": [], "conditions": {"loadavg": []},
         "summary": [{"stale": True}]}           # e.g. written by an older version
  out.write_text(json.dumps(raw))
  assert colocate_bench.main(["--render_only", "--out", str(out)]) == 0
  got = json.loads(out.read_text())
  assert got["points"] == raw["points"]          # raw points kept as they are
  d = next(s for s in got["summary"] if s.get("config") == "D")
  assert d["harvest_efficiency"] == pytest.approx(0.8) and "stale" not in got["summary"][0]
  assert "| poisson | 0.5 | D |" in (tmp_path / "results.md").read_text()
  assert (tmp_path / "colocate.png").stat().st_size > 1000
  # bad input: a clear error, the file untouched
  bad = tmp_path / "bad.json"
  bad.write_text('{"summary": []}')
  with pytest.raises(SystemExit, match="no raw 'points'"):
    colocate_bench.main(["--render_only", "--out", str(bad)])
  assert bad.read_text() == '{"summary": []}'
  with pytest.raises(SystemExit, match="cannot read"):
    colocate_bench.main(["--render_only", "--out", str(tmp_path / "missing.json")])


def test_halves_merge_into_one_point_with_time_weighted_counter_rates():
  def half(t0, t1, busy, train, lat):
    rec = {"config": "D", "rho": 0.5, "arrival": "poisson", "rate_rps": 100.0,
           "loadavg_1m": 1.0, "window_unix": [t0, t1], "requests": len(lat),
           "slo_attainment": 1.0, "latency_ms": {"p99": 1.0},
           "inference_busy_fraction": busy, "device_busy_fraction": None,
           "train_samples_per_s": train}
    raw = {"latency": np.array(lat), "recs": [[200, 1, 1]] * len(lat),
           "late": np.zeros(len(lat)), "server_ms": np.full((len(lat), 2), np.nan),
           "wall": t1 - t0, "window_unix": [t0, t1]}
    return rec, raw
  p = colocate_bench.merge_halves([half(0.0, 10.0, 0.4, 100.0, [0.001, 0.020]),
                                   half(30.0, 60.0, 0.6, 200.0, [0.002, 0.003])], 10.0)
  assert p["config"] == "D" and p["requests"] == 4 and p["slo_attainment"] == 0.75
  # rates weighted by the windows' lengths (10 s and 30 s); a missing one stays missing
  assert p["inference_busy_fraction"] == pytest.approx(0.55)
  assert p["train_samples_per_s"] == pytest.approx(175.0) and p["device_busy_fraction"] is None
  assert [h["train_samples_per_s"] for h in p["halves"]] == [100.0, 200.0]
  assert p["window_unix"] == [0.0, 60.0] and p["throughput_rps"] == pytest.approx(0.1)


def test_device_thread_fractions_chunk_time_and_their_table(tmp_path):
  acts = colocate_bench.THREAD_KEYS
  rates = {"inference": 0.3, "inference_results": 0.05, "training": 0.4,
           "training_other": 0.01, "receive": 0.06, "decide": 0.03, "wait_holdoff": 0.15}
  poll = colocate_bench.Poller({})
  poll.samples = [(t, {**{f"S:{k}": rates.get(a, 0.0) * t for a, k in acts.items()},
                       "S:coltrain_train_busy_seconds_total": 0.4 * t,
                       "S:coltrain_train_chunks_total": 500.0 * t}) for t in (5.0, 6.0, 8.0)]
  t = colocate_bench.device_thread(poll, "S", 5.0, 8.0)
  assert set(t) == set(acts) and sum(t.values()) == pytest.approx(1.0)
  assert t["receive"] == pytest.approx(0.06) and t["wait_idle"] == 0.0
  assert colocate_bench.chunk_ms(poll, "S", 5.0, 8.0) == pytest.approx(0.8)  # 0.4 s / 500
  assert colocate_bench.device_thread(poll, "T", 5.0, 8.0) is None            # no samples
  assert colocate_bench.chunk_ms(poll, "T", 5.0, 8.0) is None
  # halves merge time-weighted (10 s and 30 s windows), like the other rates
  def half(t0, t1, thread, chunk):
    rec = {"config": "D", "rho": 0.5, "arrival": "poisson", "rate_rps": 100.0,
           "loadavg_1m": 1.0, "window_unix": [t0, t1], "inference_busy_fraction": 0.3,
           "device_busy_fraction": None, "train_samples_per_s": 100.0,
           "device_thread": thread, "chunk_ms": chunk}
    raw = {"latency": np.array([0.001]), "recs": [[200, 1, 1]], "late": np.zeros(1),
           "server_ms": np.full((1, 2), np.nan), "wall": t1 - t0, "window_unix": [t0, t1]}
    return rec, raw
  p = colocate_bench.merge_halves([half(0.0, 10.0, {"training": 0.2, "receive": 0.1}, 1.0),
                                   half(30.0, 60.0, {"training": 0.6, "receive": 0.0}, 0.6)],
                                  10.0)
  assert p["device_thread"] == pytest.approx({"training": 0.5, "receive": 0.025})
  assert p["chunk_ms"] == pytest.approx(0.7)
  # the summary carries D's and A's split and D's chunk time beside B's of its round;
  # results.md tabulates them
  a = {**_point("A", 0.5, 4.0, 0.0, busy=0.3), "device_thread": {"inference": 0.3,
                                                                  "wait_idle": 0.7}}
  d = {**_point("D", 0.5, 5.0, 40.0), "device_thread": t, "chunk_ms": 0.8}
  results = {"B": {"train_samples_per_s": 100.0,
                   "runs": [{"tag": "rho=0.5", "rho": 0.5, "train_samples_per_s": 100.0,
                             "chunk_ms": 0.64}]},
             "slo_ms": 10.0, "capacity": {"rps": 500.0}, "points": [a, d], "overload": [],
             "conditions": {"loadavg": []}}
  results["summary"] = colocate_bench.summarize(results)
  sd = results["summary"][0]
  assert sd["chunk_ms"] == 0.8 and sd["chunk_ms_B"] == 0.64
  assert sd["device_thread"] is t and sd["device_thread_A"] == a["device_thread"]
  colocate_bench.write_table(results, str(tmp_path / "t.md"))
  text = (tmp_path / "t.md").read_text()
  assert "| 0.5 | A | 0.300 | 0.000 | 0.000 | 0.000 | 0.000 | 0.000 | 0.000 | 0.000 | 0.700 |  |" in text
  assert ("| 0.5 | D | 0.300 | 0.050 | 0.060 | 0.030 | 0.410 | 0.000 | 0.150 | 0.000 | 0.000 |"
          " 0.800 (B 0.640) |") in text


def test_malformed_request_set_covers_many_kinds():
  bodies = colocate_bench.malformed_bodies(1000)
  assert len(bodies) == 1000 and len({b for _, b in bodies}) > 100


def test_device_busy_fraction_is_device_cpu_time_per_second_and_core():
  poll = colocate_bench.Poller({})
  poll.samples = [(t, {"S:coltrain_device_cpu_seconds_total": 0.75 * t,
                       "S:coltrain_device_cpus": 2.0}) for t in (10.0, 10.2, 10.4, 11.0)]
  # 0.75 core-seconds per second over 2 cores
  assert colocate_bench.device_busy(poll, "S", 10.0, 11.0) == pytest.approx(0.375)
  assert colocate_bench.device_busy(poll, "T", 10.0, 11.0) is None   # no split / no data


def test_window_metrics_count_the_requests_dropped_at_dispatch():
  poll = colocate_bench.Poller({})
  key = f"S:{colocate_bench.LATE_DROPS_KEY}"
  poll.samples = [(t, {key: 30.0 * t}) for t in (1.0, 2.0, 4.0)]
  m = colocate_bench.window_metrics(poll, "A", 1.0, 4.0)
  assert m["late_drops_per_s"] == pytest.approx(30.0)
  assert colocate_bench.window_metrics(poll, "A", 1.0, 4.0, server="T")[
      "late_drops_per_s"] is None                               # no samples


def test_binary_requests_carry_the_same_images_as_json_requests():
  from coltrain.serve.protocol import parse_infer_request
  from launch.loadgen import encode_requests, request_bodies
  images = np.random.default_rng(0).integers(0, 256, (5, 28, 28, 1)).astype(np.uint8)
  got = []
  for binary in (False, True):
    bodies = request_bodies(images, 2, 3, binary=binary)
    parsed = []
    for raw in encode_requests("127.0.0.1", 80, "/v2/models/m/infer", bodies):
      head, body = raw.split(b"\r\n\r\n", 1)
      headers = dict(line.split(": ", 1) for line in head.decode().split("\r\n")[1:])
      assert int(headers["Content-Length"]) == len(body)
      n = headers.get("Inference-Header-Content-Length")
      assert (n is not None) == binary
      parsed.append(parse_infer_request(body, image_shape=(28, 28, 1), max_images=4,
                                        json_length=None if n is None else int(n)).images)
    got.append(parsed)
  for a, b, i in zip(*got, range(3)):
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a, images[[(2 * i) % 5, (2 * i + 1) % 5]])


def _knee_probe(knee: float, fail_once_at=(), pass_once_at=()):
  """A fake open-loop probe: every rate up to `knee` meets the SLO (attainment 0.995),
  faster ones do not (0.9); a rate in `fail_once_at` fails its first probe only, one in
  `pass_once_at` passes its first probe only."""
  seen = []

  def probe(rate):
    seen.append(rate)
    first = seen.count(rate) == 1
    if any(abs(rate - r) < 1e-6 for r in pass_once_at) and first:
      return {"slo_attainment": 0.995}
    flaky = any(abs(rate - r) < 1e-6 for r in fail_once_at) and first
    return {"slo_attainment": 0.9 if rate > knee or flaky else 0.995}
  return probe, seen


def test_search_capacity_climbs_to_the_knee_from_the_closed_loop_estimate():
  probe, seen = _knee_probe(knee=1000.0)
  cap, probes = colocate_bench.search_capacity(probe, 500.0, step=1.15)
  # 500 * 1.15^k: 500, 575, 661, 760, 874, 1006 (> knee); two agreeing probes decide
  assert cap == pytest.approx(500 * 1.15 ** 4)
  assert [p["passed"] for p in probes] == [True] * 10 + [False, False]
  assert seen[-1] == seen[-2] == pytest.approx(500 * 1.15 ** 5)
  assert all(p["rate_rps"] == r for p, r in zip(probes, seen))


def test_search_capacity_needs_two_of_three_probes_and_descends_if_the_start_fails():
  probe, _ = _knee_probe(knee=1000.0, fail_once_at=(575.0,))
  cap, probes = colocate_bench.search_capacity(probe, 500.0, step=1.15)
  assert cap == pytest.approx(500 * 1.15 ** 4)      # the stall at 575 did not end it
  assert [p["passed"] for p in probes][:5] == [True, True, False, True, True]
  # a rate past the knee whose first probe passes by chance is not capacity
  probe, _ = _knee_probe(knee=600.0, pass_once_at=(661.25,))
  cap, probes = colocate_bench.search_capacity(probe, 500.0, step=1.15)
  assert cap == pytest.approx(575.0)
  assert [p["passed"] for p in probes][-3:] == [True, False, False]
  probe, _ = _knee_probe(knee=300.0)
  cap, probes = colocate_bench.search_capacity(probe, 500.0, step=1.25)
  assert cap == pytest.approx(256.0)                # 500 / 1.25^3: the first to pass
  assert [p["passed"] for p in probes] == [False] * 6 + [True, True]


def test_search_capacity_never_accepts_a_rate_on_one_probe_when_probes_run_out():
  probe, _ = _knee_probe(knee=1000.0)
  # 500 passes (2 probes); 575 gets one passing probe, then the budget of 3 is spent
  cap, probes = colocate_bench.search_capacity(probe, 500.0, step=1.15, max_probes=3)
  assert cap == pytest.approx(500.0)
  assert [p["rate_rps"] for p in probes] == [500.0, 500.0, pytest.approx(575.0)]
  assert colocate_bench.generator_late_p99({"dispatch_late_ms": {"p99": 0.0}}) == 0.0
  assert colocate_bench.generator_late_p99({"dispatch_late_ms": None}) is None


def test_search_capacity_gives_up_with_a_clear_error():
  probe, _ = _knee_probe(knee=0.0)
  with pytest.raises(RuntimeError, match="no rate down to"):
    colocate_bench.search_capacity(probe, 500.0, max_probes=6)
  with pytest.raises(ValueError, match="start_rps must be positive"):
    colocate_bench.search_capacity(probe, 0.0)


def test_overload_table_shows_the_generators_lateness(tmp_path):
  results = {"B": {"train_samples_per_s": 100.0}, "slo_ms": 10.0,
             "capacity": {"rps": 500.0, "closed_loop_best_rps": 300.0},
             "points": [_point("A", 0.5, 4.0, 0.0), _point("D", 0.5, 5.0, 40.0)],
             "overload": [{"config": "D", "rate_rps": 750.0, "throughput_rps": 600.0,
                           "shed_fraction": 0.2, "slo_attainment": 0.79,
                           "slo_attainment_admitted": 0.99, "latency_ms": {"p99": 9.5},
                           "slo_attainment_admitted_from_send": 0.995,
                           "dispatch_late_ms": {"p50": 0.1, "p99": 3.25, "max": 5.0}}],
             "conditions": {"loadavg": []}}
  results["summary"] = colocate_bench.summarize(results)
  colocate_bench.write_table(results, str(tmp_path / "t.md"))
  text = (tmp_path / "t.md").read_text()
  assert "capacity 500 req/s (closed-loop best 300)" in text
  assert "| D | 750 | 600 | 0.200 | 0.7900 | 0.9900 | 9.50 | 3.25 | 0.9950 |" in text
