"""Front-end cost: coltrain's HTTP server vs uvicorn (ASGI), CPU per request.

  python -m launch.bench_frontend [--rounds 3] [--duration 4] [--concurrency 8] \
      [--out results/frontend/results.json]

Both servers answer `POST /v2/models/m/infer` with the same fixed KServe v2 response
(no parsing, no model: only the HTTP framework's work is measured), on one event-loop
thread with uvloop and the httptools parser, in their own process pinned to the first
core. `launch.loadgen` (closed loop, `--concurrency` keep-alive connections, 784-pixel
JSON bodies as in the co-location benchmark) drives them from another process pinned to
the last core. Per run: the server process's CPU seconds (user + system, from /proc)
per request served, and requests/s. The two servers alternate for `--rounds` rounds;
the summary gives the medians and the ratio coltrain / uvicorn (measured in the same
run, so machine noise affects both).

  python -m launch.bench_frontend --serve {coltrain,uvicorn} --port_file F   (internal)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SERVERS = ("coltrain", "uvicorn")
RESPONSE = {"model_name": "m", "model_version": "0",
            "outputs": [{"name": "logits", "datatype": "FP32", "shape": [1, 10],
                         "data": [0.5] * 10},
                        {"name": "label", "datatype": "INT64", "shape": [1], "data": [0]}]}


def _serve(kind: str, port_file: str) -> None:
  """Runs one server until killed; writes its port to `port_file` once listening."""
  import asyncio
  import socket

  import orjson
  import uvloop

  body = orjson.dumps(RESPONSE)
  sock = socket.socket()
  sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
  sock.bind(("127.0.0.1", 0))

  def ready() -> None:
    with open(port_file + ".tmp", "w") as f:
      f.write(str(sock.getsockname()[1]))
    os.replace(port_file + ".tmp", port_file)

  if kind == "coltrain":
    from coltrain.serve.http import HTTPServer, Response

    async def main():
      server = HTTPServer(lambda request: Response(200, body), clock=time.monotonic)
      await server.start(sock)
      ready()
      await asyncio.Event().wait()

    uvloop.run(main())
  else:
    import uvicorn
    headers = [(b"content-type", b"application/json"),
               (b"content-length", str(len(body)).encode())]

    async def app(scope, receive, send):
      if scope["type"] != "http":
        return
      more = True
      while more:
        more = (await receive()).get("more_body", False)
      await send({"type": "http.response.start", "status": 200, "headers": headers})
      await send({"type": "http.response.body", "body": body})

    config = uvicorn.Config(app, loop="uvloop", http="httptools", lifespan="off",
                            access_log=False, log_level="warning")
    server = uvicorn.Server(config)

    async def main():
      serving = asyncio.ensure_future(server.serve(sockets=[sock]))
      while not server.started:   # listening: tell the driver
        if serving.done():
          return await serving
        await asyncio.sleep(0.01)
      ready()
      await serving

    uvloop.run(main())


def _cpu_seconds(pid: int) -> float:
  with open(f"/proc/{pid}/stat") as f:
    fields = f.read().rsplit(")", 1)[1].split()
  return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure(kind: str, workdir: str, duration: float, concurrency: int,
            server_cpu: int, client_cpu: int) -> dict:
  port_file = os.path.join(workdir, f"{kind}.port")
  if os.path.exists(port_file):
    os.remove(port_file)
  proc = subprocess.Popen([sys.executable, "-m", "launch.bench_frontend", "--serve", kind,
                           "--port_file", port_file], cwd=REPO)
  try:
    os.sched_setaffinity(proc.pid, {server_cpu})
    deadline = time.time() + 60
    while not os.path.exists(port_file):
      if proc.poll() is not None or time.time() > deadline:
        raise RuntimeError(f"the {kind} server did not start")
      time.sleep(0.05)
    url = f"http://127.0.0.1:{open(port_file).read()}"
    out = os.path.join(workdir, f"{kind}.json")
    cpu0 = _cpu_seconds(proc.pid)
    subprocess.run([sys.executable, "-m", "launch.loadgen", "--url", url, "--model", "m",
                    "--mode", "closed", "--concurrency", str(concurrency),
                    "--duration", str(duration), "--cpus", str(client_cpu), "--out", out],
                   cwd=REPO, check=True, stdout=subprocess.DEVNULL)
    cpu = _cpu_seconds(proc.pid) - cpu0
    res = json.load(open(out))
  finally:
    proc.kill()
    proc.wait()
  served = res["codes"].get("200", 0)
  if served == 0 or served != res["requests"]:
    raise RuntimeError(f"{kind}: {served} of {res['requests']} requests answered 200")
  return {"server": kind, "requests": served, "requests_per_s": res["throughput_rps"],
          "cpu_us_per_request": 1e6 * cpu / served,
          "p50_ms": res["latency_ms"]["p50"], "p99_ms": res["latency_ms"]["p99"]}


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--rounds", type=int, default=3)
  p.add_argument("--duration", type=float, default=4.0)
  p.add_argument("--concurrency", type=int, default=8)
  p.add_argument("--out", default=None)
  p.add_argument("--serve", choices=SERVERS, help=argparse.SUPPRESS)
  p.add_argument("--port_file", help=argparse.SUPPRESS)
  a = p.parse_args(argv)
  if a.serve:
    _serve(a.serve, a.port_file)
    return 0
  cpus = sorted(os.sched_getaffinity(0))
  server_cpu, client_cpu = cpus[0], cpus[-1]
  runs = []
  with tempfile.TemporaryDirectory() as wd:
    for r in range(a.rounds):
      for kind in (SERVERS if r % 2 == 0 else SERVERS[::-1]):
        runs.append(measure(kind, wd, a.duration, a.concurrency, server_cpu, client_cpu))
        print(json.dumps(runs[-1]), file=sys.stderr)
  med = {k: {m: float(np.median([x[m] for x in runs if x["server"] == k]))
             for m in ("cpu_us_per_request", "requests_per_s", "p50_ms", "p99_ms")}
         for k in SERVERS}
  summary = {"median": med,
             "cpu_ratio_coltrain_over_uvicorn": med["coltrain"]["cpu_us_per_request"]
             / med["uvicorn"]["cpu_us_per_request"],
             "throughput_ratio_coltrain_over_uvicorn": med["coltrain"]["requests_per_s"]
             / med["uvicorn"]["requests_per_s"]}
  result = {"runs": runs, "summary": summary,
            "conditions": {"rounds": a.rounds, "duration_s": a.duration,
                           "concurrency": a.concurrency, "server_cpu": server_cpu,
                           "client_cpu": client_cpu, "loadavg": os.getloadavg()}}
  if a.out:
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    with open(a.out, "w") as f:
      json.dump(result, f, indent=1)
  print(json.dumps(summary))
  return 0


if __name__ == "__main__":
  sys.exit(main())
