"""Training in bounded chunks, with the same building blocks as `launch.train`.

`ChunkTrainer` trains the served model with `coltrain.train.make_train_step` (the same
pure step `train_and_evaluate` jits) over micro-batches: the optimizer is wrapped in
`optax.MultiSteps`, so `batch_size / micro_batch_size` consecutive micro-batches
accumulate their gradients into one optimizer step (all but the last of them run
`coltrain.train.make_accumulate_step`, the same result at two thirds of the cost for
LeNet: no discarded optimizer update). The micro-batches are slices of
`coltrain.data.train_batches`' global batches, exactly the batches `launch.train` would
see, so an optimizer step
equals a `launch.train` step up to float summation order (tested). Precision policies
(`numerics.policy`) apply as in `launch.train`; every phase's step is compiled up front.

`run_chunk()` runs `chunk_steps` micro-batches and blocks until they are done. Every
`publish_every` optimizer steps a copy of the weights is taken (the train state's buffers
are donated) and handed to `publish` after the next chunk, whose first micro-batch is
computed with exactly those weights, gave finite losses (after the last step of a run:
once the weights are checked finite). A non-finite loss stops training for good
(`failure` says why); the last published (good) weights keep serving.
"""

from __future__ import annotations

import math
import queue
import threading
import time
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from coltrain.data import DatasetSpec, load_split, train_batches, train_batches_in_memory
from coltrain.numerics.policy import ResolvedPolicy
from coltrain.serve.model import Weights
from coltrain.train.optim import make_optimizer
from coltrain.train.state import TrainState, create_train_state
from coltrain.train.step import make_accumulate_step, make_train_step


PREFETCH_BATCHES = 2      # global batches read ahead by the input thread
IN_MEMORY_MAX_BYTES = 512 << 20   # smaller train splits are decoded once, kept in memory

# One dispatch copies a whole pytree (outputs of a jit without donation are fresh
# buffers).
_copy_tree = jax.jit(lambda tree: jax.tree.map(jnp.copy, tree))


def _continue_with_micro_steps(state: TrainState, tx: optax.MultiSteps,
                               k: int) -> tuple[TrainState, int]:
  """A `launch.train` state at optimizer step S (optimizer `tx.inner_opt`) as this
  trainer's state: the same weights, model state and PRNG key, the inner optimizer's
  state inside a `MultiSteps` state with S gradient steps and no micro-batch
  accumulated, and the step counted in micro-batches (S x k). Returns (state, S)."""
  start = int(jax.device_get(state.step))
  fresh = tx.init(state.params)
  opt_state = fresh._replace(inner_opt_state=state.opt_state,
                             gradient_step=jnp.asarray(start, fresh.gradient_step.dtype))
  return state.replace(step=jnp.asarray(start * k, state.step.dtype),
                       opt_state=opt_state), start


class ChunkTrainer:
  """Owns the train state; only its scheduler thread calls `run_chunk`."""

  def __init__(self, config: ml_collections.ConfigDict, model, spec: DatasetSpec,
               train_source, numerics: Optional[ResolvedPolicy], device,
               publish: Callable[[Weights], None], initial: Optional[TrainState] = None):
    """`initial`: a `launch.train` state of `make_optimizer(config.optimizer,
    config.steps)` at optimizer step S (`coltrain.serve.init_from`) to continue from:
    its weights, optimizer state and step, and the data from global batch S on, as
    `launch.train` would resume; None: a fresh state from `config.seed`."""
    self.micro_batch = config.serve.micro_batch_size
    self.accumulate = config.batch_size // self.micro_batch
    self.chunk_steps = config.serve.chunk_steps
    self.publish_every = config.serve.publish_every
    self.total_steps = config.steps
    self.numerics = numerics
    self._publish = publish
    tx, schedule = make_optimizer(config.optimizer, config.steps)
    k = self.accumulate
    self.tx = optax.MultiSteps(tx, every_k_schedule=k)
    start = 0
    if initial is None:
      state = create_train_state(model, self.tx, config.seed, (1,) + spec.image_shape)
      if numerics is not None:  # weights live in the storage format from the start
        state = state.replace(params=numerics.store(state.params, 0))
    else:
      state, start = _continue_with_micro_steps(initial, self.tx, k)
    self.state = jax.device_put(state, device)
    self.device = device
    self.image_shape = tuple(spec.image_shape)
    # Whole global batches (one per optimizer step, not per micro-batch), cut into
    # micro-batches by slicing. A host thread reads them ahead (`_fetch`), so a chunk
    # never waits for the input pipeline; a small split is decoded once and batches are
    # gathered from memory (the same batches: `train_batches_in_memory`), because
    # decoding a global batch takes milliseconds of Python that the front end and the
    # scheduler would wait for (the GIL).
    if len(train_source) * int(np.prod(spec.image_shape)) <= IN_MEMORY_MAX_BYTES:
      self._batches = train_batches_in_memory(load_split(train_source),
                                              global_batch_size=config.batch_size,
                                              seed=config.seed, start_step=start)
    else:
      self._batches = train_batches(train_source, global_batch_size=config.batch_size,
                                    seed=config.seed, start_step=start)
    self._ahead: queue.Queue = queue.Queue(maxsize=PREFETCH_BATCHES)
    self._closed = threading.Event()
    self._fetcher = threading.Thread(target=self._fetch, name="train-data", daemon=True)
    self._fetcher.start()
    self._global = self._next_global()
    batch = {"image": jax.ShapeDtypeStruct((self.micro_batch,) + spec.image_shape, np.uint8),
             "label": jax.ShapeDtypeStruct((self.micro_batch,), np.int32)}
    num_phases = numerics.num_phases if numerics is not None else 1
    # Per phase: the micro-batch that completes an optimizer step runs the whole step
    # (`_steps`), the others only accumulate their gradient (`_accumulate`, the same
    # result without the update `MultiSteps` computes and discards; see
    # `make_accumulate_step`).
    self._steps, self._accumulate = {}, {}
    lr = lambda s: schedule(s // k)   # the learning-rate metric counts optimizer steps
    compile_step = lambda fn: jax.jit(fn, donate_argnums=0).lower(self.state, batch).compile()
    for phase in range(num_phases):
      self._steps[phase] = compile_step(
          make_train_step(model, self.tx, lr, spec, numerics, phase))
      self._accumulate[phase] = compile_step(
          make_accumulate_step(model, lr, spec, numerics, phase))
    self.micro_steps = start * k  # micro-batches trained (a resumed run's count)
    self.samples = 0              # samples trained by this trainer
    self.published_version = start  # optimizer step of the last published weights
    self.failure: Optional[str] = None
    self._pending: Optional[Weights] = None  # published once a chunk validates them
    self._candidate = start                  # optimizer step of the last copy taken
    self.enabled = True           # paused when False (admin switch)
    self.last_loss = float("nan")

  # -- input -----------------------------------------------------------------------------
  def _fetch(self) -> None:
    """Host thread: puts the global batches, in order, into `_ahead` (an exception, if
    the pipeline fails, goes there too and ends the thread)."""
    try:
      for batch in self._batches:
        while not self._closed.is_set():
          try:
            self._ahead.put(batch, timeout=0.2)
            break
          except queue.Full:
            continue
        if self._closed.is_set():
          return
    except Exception as e:  # surfaces in the next chunk, which fails the training
      self._ahead.put(e)

  def _next_global(self, block: bool = True) -> dict:
    """The next global batch from the input thread (raises `queue.Empty` if
    `block=False` and none is ready)."""
    batch = self._ahead.get(block)
    if isinstance(batch, Exception):
      raise RuntimeError(f"the training input pipeline failed: {batch}") from batch
    return batch

  def close(self) -> None:
    """Stops the input thread (the trainer cannot train afterwards)."""
    self._closed.set()
    self._fetcher.join(5)

  # -- state ---------------------------------------------------------------------------
  @property
  def opt_steps(self) -> int:
    """Optimizer steps completed."""
    return self.micro_steps // self.accumulate

  @property
  def finished(self) -> bool:
    """Whether every optimizer step is done (`opt_steps >= total_steps`, in micro-steps:
    `active` asks it for every admitted request)."""
    return self.micro_steps >= self.total_steps * self.accumulate

  def input_ready(self) -> bool:
    """Whether the next micro-batch is at hand (a chunk never waits for input: the
    scheduler leaves the device to inference until the input thread catches up)."""
    return self._global is not None or not self._ahead.empty()

  @property
  def active(self) -> bool:
    """Whether `run_chunk` would train (enabled, not failed, not finished)."""
    return self.enabled and self.failure is None and not self.finished

  def phase_at(self, opt_step: int) -> int:
    if self.numerics is None:
      return 0
    return self.numerics.phase_at(min(opt_step, self.total_steps - 1), self.total_steps)

  def weights(self) -> Weights:
    """A copy of the current weights (fresh buffers on the trainer's device, made by one
    dispatched computation; safe from the train state's donation)."""
    phase = self.phase_at(max(self.opt_steps - 1, 0))
    params, model_state = _copy_tree((self.state.params, self.state.model_state))
    return Weights(self.opt_steps, params, model_state, phase)

  # -- work ----------------------------------------------------------------------------
  def _step_for(self, micro_step: int, phase: int):
    """The compiled step of micro-batch number `micro_step`: the whole `MultiSteps` step
    if it completes an optimizer step, else the accumulate step."""
    if micro_step % self.accumulate == self.accumulate - 1:
      return self._steps[phase]
    return self._accumulate[phase]

  def warmup(self, runs: int = 3) -> list[float]:
    """Times `runs` chunks on a throwaway copy of the state (the real state and data
    stream are untouched), each micro-batch running the step the real one at that
    position would (accumulate only, or complete an optimizer step); returns the
    durations in seconds."""
    times = []
    batch = {"image": np.zeros((self.micro_batch,) + self.image_shape, np.uint8),
             "label": np.zeros((self.micro_batch,), np.int32)}
    scratch = jax.tree.map(jnp.copy, self.state)
    phase = self.phase_at(self.opt_steps)
    micro = self.micro_steps
    for _ in range(runs):
      t0 = time.perf_counter()
      for _ in range(self.chunk_steps):
        scratch, m = self._step_for(micro, phase)(scratch, batch)
        micro += 1
      jax.block_until_ready(m["loss"])
      times.append(time.perf_counter() - t0)
    return times

  def run_chunk(self) -> int:
    """Trains up to `chunk_steps` micro-batches (fewer at the end of the run, or when
    the input thread has not read the next global batch yet), blocking until done;
    returns the samples trained (0 if not active)."""
    if not self.active:
      return 0
    steps = min(self.chunk_steps, self.total_steps * self.accumulate - self.micro_steps)
    losses = []
    for _ in range(steps):
      if self._global is None:
        try:
          self._global = self._next_global(block=False)
        except queue.Empty:
          break
      j = self.micro_steps % self.accumulate
      fn = self._step_for(self.micro_steps, self.phase_at(self.opt_steps))
      m = self.micro_batch
      micro = {k: v[j * m:(j + 1) * m] for k, v in self._global.items()}
      # queued with asynchronous dispatch; run at once with synchronous (launch.serve)
      self.state, metrics = fn(self.state, micro)
      losses.append(metrics["loss"])
      self.micro_steps += 1
      if j == self.accumulate - 1:
        self._global = None                         # read ahead by the input thread
    n = len(losses)
    if not n:
      return 0
    # np.asarray per scalar: 0.3 us over the wait, where jax.device_get's tree
    # handling took 8 us (once per chunk, on the device's core)
    losses = [float(np.asarray(x)) for x in losses]
    self.samples += n * self.micro_batch
    bad = [x for x in losses if not math.isfinite(x)]
    if bad:
      self._pending = None
      self.failure = (f"non-finite training loss {bad[0]} at optimizer step {self.opt_steps}"
                      f" (micro-batch {self.micro_steps}); training stopped, serving "
                      f"continues on version {self.published_version}")
      return n * self.micro_batch
    self.last_loss = losses[-1]
    if self._pending is not None:  # its weights just gave finite losses: publish them
      w, self._pending = self._pending, None
      self.published_version = w.version
      self._publish(w)
    if self.opt_steps - max(self.published_version, self._candidate) >= self.publish_every or (
        self.finished and self.opt_steps > self.published_version):
      self._candidate = self.opt_steps
      self._pending = self.weights()   # one dispatched copy of the weights
      if self.finished:                # no later chunk will validate it: check it here
        self._validate_final()
    return n * self.micro_batch

  def _validate_final(self) -> None:
    w, self._pending = self._pending, None
    finite = all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(w.params))
    if not finite:
      self.failure = (f"non-finite weights at optimizer step {w.version}; serving "
                      f"continues on version {self.published_version}")
      return
    self.published_version = w.version
    self._publish(w)
