"""End-to-end: `launch.serve` (2 replicas on 2 simulated CPU devices) driven by
`launch.loadgen` processes over 127.0.0.1: open-loop load while training publishes new
versions, least-expected-completion routing over both replicas, overload shedding,
1,000 malformed requests, clean SIGTERM shutdown."""

import json
import os
import signal
import subprocess
import sys

import pytest

from coltrain.serve.metrics import parse_metrics
from launch.colocate_bench import ServeProcess, malformed_check, run_loadgen

pytestmark = [pytest.mark.slow,
              pytest.mark.serial]   # wall-clock timing: runs alone (pyproject's `serial`)


@pytest.fixture(scope="module")
def served(tfds_dir, tmp_path_factory):
  work = str(tmp_path_factory.mktemp("serve"))
  env = dict(os.environ, JAX_NUM_CPU_DEVICES="2")
  old = os.environ.copy()
  os.environ.update(env)   # ServeProcess inherits the environment
  try:
    s = ServeProcess("S", work, [
        "--config.model=mlp", "--config.batch_size=16", "--config.serve.replicas=2",
        "--config.serve.micro_batch_size=8", "--config.serve.publish_every=2",
        "--config.serve.max_batch_size=8", "--config.serve.model_name=lenet"], timeout=240,
        nice=min(os.getpriority(os.PRIO_PROCESS, 0) + 1, 19))
  finally:
    os.environ.clear()
    os.environ.update(old)
  try:
    s.wait_ready()
    yield s
  finally:
    if s.proc.poll() is None:
      s.proc.kill()   # SIGKILL on teardown; the shutdown test stops it gracefully first
      s.proc.wait(30)


def test_the_server_and_its_front_end_run_at_the_niceness_they_were_started_at(served):
  want = min(os.getpriority(os.PRIO_PROCESS, 0) + 1, 19)
  assert os.getpriority(os.PRIO_PROCESS, served.proc.pid) == want
  kids = served.child_pids()
  assert kids, "the front end process is the server's child"
  assert all(os.getpriority(os.PRIO_PROCESS, k) == want for k in kids)


def test_open_loop_load_is_served_by_both_replicas_while_versions_advance(served):
  meta = json.loads(served.get("/v2/models/lenet"))
  slo = meta["parameters"]["slo_ms"]
  assert meta["parameters"]["replicas"] == 2
  r = run_loadgen(served.url, ["--model", "lenet", "--mode", "open", "--rate", "150",
                               "--arrival", "gamma", "--cv", "2", "--duration", "4",
                               "--slo_ms", str(slo)], timeout=180)
  assert r["requests"] == sum(r["codes"].values()) > 300
  assert r["codes"].get("200", 0) > 0.5 * r["requests"]
  assert set(r["codes"]) <= {"200", "503"}
  r2 = run_loadgen(served.url, ["--model", "lenet", "--mode", "closed", "--concurrency",
                                "6", "--duration", "3"], timeout=180)
  assert r2["codes"].get("200", 0) > 0
  m = parse_metrics(served.get("/metrics").decode())
  for replica in ("0", "1"):   # least expected completion time spreads the load
    assert m[f'coltrain_inference_busy_seconds_total{{replica="{replica}"}}'] > 0
  assert m["coltrain_train_steps_total"] >= 2
  assert r2["versions"]["max"] >= 2   # published versions reach the responses


def test_overload_sheds_and_keeps_serving(served):
  cap = run_loadgen(served.url, ["--model", "lenet", "--mode", "closed", "--concurrency",
                                 "4", "--duration", "2"], timeout=120)["throughput_rps"]
  r = run_loadgen(served.url, ["--model", "lenet", "--mode", "open", "--rate",
                               str(max(2.0 * cap, 200.0)), "--duration", "2",
                               "--images_per_request", "4"], timeout=180)
  assert r["codes"].get("503", 0) > 0 and r["codes"].get("200", 0) > 0
  assert r["requests"] == sum(r["codes"].values())
  assert json.loads(served.get("/v2/health/ready"))["ready"] is True


def test_a_thousand_malformed_requests_leave_the_server_healthy(served):
  res = malformed_check(served, 1000)
  codes = res["codes"]
  assert sum(codes.values()) == 1000
  # each is answered as malformed, except one the front end refuses unparsed (503)
  # because its event loop fell behind by half the SLO, as coltrain.serve.frontend
  # documents; that takes a stall of the machine, so it must stay rare (1 of 1,000 in a
  # CI run of f555c1a)
  assert set(codes) <= {"400", "411", "413", "503"}, codes
  assert codes.get("503", 0) <= 10 and codes.get("400", 0) >= 990, codes
  assert res["ready_after"] and res["valid_request_after"] and res["server_alive"]


def test_sigterm_stops_the_server_cleanly(served):
  served.proc.send_signal(signal.SIGTERM)
  assert served.proc.wait(60) == 0
  served._log.flush()
  assert "coltrain-serve: stopped" in open(served.log_path).read()


def test_bad_config_exits_with_status_2(tfds_dir):
  out = subprocess.run([sys.executable, "-m", "launch.serve", "--config", "configs/serve.py",
                        "--config.serve.max_batch_size=12"], capture_output=True, text=True,
                       timeout=120, cwd=os.path.dirname(os.path.dirname(__file__)))
  assert out.returncode == 2 and "power of two" in out.stderr
  out = subprocess.run([sys.executable, "-m", "launch.serve", "--config", "configs/serve.py",
                        "--config.serve.slo=3"], capture_output=True, text=True,
                       timeout=120, cwd=os.path.dirname(os.path.dirname(__file__)))
  assert out.returncode == 2 and "did you mean 'serve.slo_ms'" in out.stderr
