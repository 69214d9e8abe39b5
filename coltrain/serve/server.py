"""`Server`: the co-located inference + training server assembled from a serving config.

    server = Server(config)      # validates, builds, precompiles, measures (no serving yet)
    server.start()               # scheduler threads + the HTTP front-end process; server.url
    ...
    server.stop()

One `DeviceScheduler` per replica (replica r on local JAX device r), the `Router` in
front, and with `serve.train` a `ChunkTrainer` on replica `serve.train_replica` whose
published weights go to every replica. The served model starts from the training run's
initial weights (`seed`); its version is the optimizer step that produced the weights.
HTTP is served by a separate front-end process (`coltrain.serve.bridge.FrontEndProcess`,
bound at construction, started by `start()`, stopped by `stop()`), so request parsing
and encoding never hold this process's GIL.
"""

from __future__ import annotations

import http.client
import json
import sys
import time
from typing import Any, Optional

import jax
import ml_collections
import numpy as np

from coltrain.config import ConfigError
from coltrain.data import open_dataset
from coltrain.models import get_model
from coltrain.serve.config import validate_serve
from coltrain.cpus import CpuPartition, DeviceCpuClock
from coltrain.serve.bridge import FrontEndProcess
from coltrain.serve.buckets import parse_buckets
from coltrain.serve.init_from import restore_train_state
from coltrain.serve.metrics import ServeMetrics
from coltrain.serve.model import Predictor, Weights
from coltrain.serve.router import Router
from coltrain.serve.scheduler import THREAD_ACTIVITIES, DeviceScheduler
from coltrain.serve.timing import clock
from coltrain.serve.trainer import ChunkTrainer
from coltrain.train.loop import resolve_numerics
from coltrain.train.optim import make_optimizer
from coltrain.train.state import create_train_state

AUTO_SLO_FACTOR = 5.0       # auto SLO = this x the standalone batch-1 median latency
CALIBRATION_REQUESTS = 100
CALIBRATION_GAP_S = 0.01    # idle time before each calibration request (isolated requests)
CALIBRATION_SLO_S = 10.0


class Server:
  """See module docstring. Raises `ConfigError` for an invalid config."""

  def __init__(self, config: ml_collections.ConfigDict, log=None):
    self.log = log or (lambda msg: print(f"coltrain-serve: {msg}", file=sys.stderr,
                                         flush=True))
    config = validate_serve(config)
    self.config = config
    s = config.serve
    devices = jax.local_devices()
    if s.replicas > len(devices):
      raise ConfigError(
          f"invalid config:\n  - 'serve.replicas' is {s.replicas} but JAX sees "
          f"{len(devices)} local device(s) (on CPU set JAX_NUM_CPU_DEVICES={s.replicas})")
    sources, spec = open_dataset(config.dataset, config.data_dir or None)
    self.spec = spec
    self.image_shape = tuple(spec.image_shape)
    self.max_batch = s.max_batch_size
    self.model_name = s.model_name or config.model
    model = get_model(config.model, spec.num_classes)
    numerics = resolve_numerics(config.numerics, model, (1,) + self.image_shape)
    self.metrics = ServeMetrics()
    self._router: Optional[Router] = None

    initial = None
    if s.init_from:   # a launch.train run's latest checkpoint
      tx, _ = make_optimizer(config.optimizer, config.steps)
      initial = restore_train_state(s.init_from, model, tx, config.seed, self.image_shape,
                                    numerics)
      self.log(f"starting from {s.init_from}: optimizer step {int(initial.step)}")
    self.trainer: Optional[ChunkTrainer] = None
    if s.train:
      self.trainer = ChunkTrainer(config, model, spec, sources["train"], numerics,
                                  devices[s.train_replica], publish=self._publish,
                                  initial=initial)
      weights = self.trainer.weights()
    else:
      if initial is None:
        tx, _ = make_optimizer(config.optimizer, config.steps)
        initial = create_train_state(model, tx, config.seed, (1,) + self.image_shape)
        if numerics is not None:
          initial = initial.replace(params=numerics.store(initial.params, 0))
      version = int(initial.step)
      phase = 0 if numerics is None else numerics.phase_at(
          min(max(version - 1, 0), config.steps - 1), config.steps)
      weights = Weights(version, initial.params, initial.model_state, phase)

    self.schedulers = []
    for r in range(s.replicas):
      predictor = Predictor(model, spec, numerics, devices[r], s.max_batch_size, weights,
                            parse_buckets(s.batch_buckets, s.max_batch_size))
      self.schedulers.append(DeviceScheduler(
          r, predictor, weights, slo_s=s.slo_ms / 1e3 or 1.0,
          max_queue_delay_s=s.max_queue_delay_ms / 1e3, margin_s=s.margin_ms / 1e3,
          max_queue=s.max_queue, metrics=self.metrics,
          trainer=self.trainer if r == s.train_replica else None,
          max_chunk_s=s.max_chunk_ms / 1e3, chunk_overrun=s.chunk_overrun,
          train_queue_delay_cap=s.train_queue_delay_cap, drop_late=s.drop_late))
    for sch in self.schedulers:
      self.metrics.track_thread_seconds(sch.index, sch.thread_seconds, THREAD_ACTIVITIES)
      self.metrics.track_batching(sch.index, lambda s=sch: s.batching_wait(clock()),
                                  lambda s=sch: s.inference_busy(clock()))
    self.warmup_seconds = [sch.warmup() for sch in self.schedulers]
    self.batch1_device_s = float(np.median([w[1] for w in self.warmup_seconds]))
    self.batch1_http_s: Optional[float] = None
    self._router = Router(self.schedulers, self.metrics, CALIBRATION_SLO_S,
                          s.margin_ms / 1e3, s.shed_holdoff_ms / 1e3, s.overload_headroom,
                          s.late_quantile)
    self.metrics.track_admission(lambda: self._router.headroom_s(self.slo_s),
                                 self._router.late_reserve_s)
    self._http = FrontEndProcess(self, s.host, s.port, use_ring=s.request_ring)
    self.port = self._http.port
    self.url = f"http://{s.host}:{self.port}"
    self._set_slo(s.slo_ms / 1e3 if s.slo_ms > 0 else CALIBRATION_SLO_S)
    self.metrics.model_version.set(weights.version)
    self.cpus = CpuPartition.from_config(s.device_cpus)
    self._cpus_before: dict = {}
    if self.cpus is not None:   # counts the threads once `start()` pinned them there
      self.metrics.track_device_cpu(DeviceCpuClock(self.cpus.device).seconds,
                                    len(self.cpus.device))

  def _set_slo(self, slo_s: float) -> None:
    self.slo_s = slo_s
    self._router.slo_s = slo_s
    for sch in self.schedulers:
      sch.slo_s = slo_s
    self.metrics.slo_seconds.set(slo_s)
    self._http.set_slo(slo_s)   # (a front end not started yet gets it in its HELLO)

  def _calibrate(self, requests: int = CALIBRATION_REQUESTS) -> float:
    """Median latency of `requests` isolated batch-1 requests through this server's
    own HTTP endpoint (loopback, keep-alive), training paused. Returns seconds.

    Each request follows `CALIBRATION_GAP_S` of idle time, so it finds the server idle
    as a standalone request does (back to back, the threads and cores stay awake between
    requests and the median is about half as long, which no request sees under load)."""
    body = json.dumps({"inputs": [{"name": "images", "datatype": "FP32",
                                   "shape": [1, *self.image_shape],
                                   "data": [0.0] * int(np.prod(self.image_shape))}]}).encode()
    conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
    times = []
    try:
      for _ in range(requests + 10):
        time.sleep(CALIBRATION_GAP_S)
        t0 = time.perf_counter()
        conn.request("POST", f"/v2/models/{self.model_name}/infer", body)
        resp = conn.getresponse()
        resp.read()
        times.append(time.perf_counter() - t0)
        if resp.status != 200:
          raise RuntimeError(f"calibration request failed with HTTP {resp.status}")
    finally:
      conn.close()
    return float(np.median(times[10:]))

  # -- life cycle ------------------------------------------------------------------------
  @property
  def router(self) -> Router:
    return self._router

  def start(self) -> "Server":
    """Starts serving; with `serve.slo_ms = 0` first measures the standalone batch-1
    median latency over HTTP (training paused) and sets the SLO to 5x it."""
    s = self.config.serve
    if self.cpus is not None:   # XLA's pools -> device cores, Python's threads -> host
      self._cpus_before = self.cpus.pin_threads()
    for sch in self.schedulers:
      sch.start(on_thread_start=self.cpus.pin_device_thread if self.cpus else None)
    self._http.start(self.cpus)
    if s.slo_ms == 0:
      enabled = self.trainer.enabled if self.trainer is not None else False
      self.set_training(False)
      try:
        self.batch1_http_s = self._calibrate()
      finally:
        self.set_training(enabled)
      self._set_slo(AUTO_SLO_FACTOR * self.batch1_http_s)
    chunk = self.schedulers[s.train_replica].timer.mean("chunk")
    self.log(f"{self.model_name} ({self.config.model} on {self.spec.name}), {s.replicas} "
             f"replica(s), SLO {1e3 * self.slo_s:.2f} ms"
             + ("" if self.batch1_http_s is None else
                f" (5 x batch-1 median over HTTP {1e3 * self.batch1_http_s:.3f} ms)")
             + f", batch-1 device time {1e3 * self.batch1_device_s:.3f} ms, max batch "
             f"{s.max_batch_size}, training "
             + (f"on (micro-batch {s.micro_batch_size} x {self.trainer.accumulate}, chunk "
                f"{1e3 * chunk:.2f} ms)" if self.trainer else "off"))
    return self

  def stop(self) -> None:
    self._http.stop()
    for sch in self.schedulers:
      sch.stop()
    if self.trainer is not None:
      self.trainer.close()
    CpuPartition.restore(self._cpus_before)

  @property
  def ready(self) -> bool:
    return all(sch.alive for sch in self.schedulers) and self._http.error is None

  # -- training --------------------------------------------------------------------------
  def _publish(self, weights: Weights) -> None:
    if self._router is not None:
      self._router.publish(weights)

  def set_training(self, enabled: bool) -> None:
    """Pauses (False) or resumes (True) co-located training."""
    if self.trainer is not None:
      self.trainer.enabled = enabled
      for sch in self.schedulers:
        sch.wake()

  def training_status(self) -> dict[str, Any]:
    t = self.trainer
    if t is None:
      return {"configured": False}
    return {"configured": True, "enabled": t.enabled, "active": t.active,
            "finished": t.finished, "failure": t.failure, "optimizer_steps": t.opt_steps,
            "samples": t.samples, "published_version": t.published_version,
            "micro_batch_size": t.micro_batch, "accumulate": t.accumulate,
            "last_loss": t.last_loss if t.last_loss == t.last_loss else None,
            "chunk_ms": (lambda m: None if m is None else 1e3 * m)(
                self.schedulers[self.config.serve.train_replica].timer.mean("chunk"))}

  # -- metadata --------------------------------------------------------------------------
  def server_metadata(self) -> dict[str, Any]:
    return {"name": "coltrain", "version": "0", "extensions": ["coltrain_training"]}

  def model_metadata(self) -> dict[str, Any]:
    version = self.schedulers[0].weights.version
    return {"name": self.model_name, "versions": [str(version)], "platform": "jax",
            "inputs": [{"name": "images", "datatype": "FP32",
                        "shape": [-1, *self.image_shape]}],
            "outputs": [{"name": "logits", "datatype": "FP32",
                         "shape": [-1, self.spec.num_classes]},
                        {"name": "label", "datatype": "INT64", "shape": [-1]}],
            "parameters": {"slo_ms": 1e3 * self.slo_s, "max_batch_size": self.max_batch,
                           "replicas": len(self.schedulers),
                           "training": self.training_status()}}
