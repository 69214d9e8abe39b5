"""optax optimizers and learning-rate schedules from the `optimizer.*` config group."""

from __future__ import annotations

import ml_collections
import optax


def make_schedule(opt: ml_collections.ConfigDict, steps: int) -> optax.Schedule:
  """Learning rate as a function of the optimizer step (0-based)."""
  if opt.schedule == "constant":
    return optax.constant_schedule(opt.learning_rate)
  if opt.schedule == "cosine":
    return optax.cosine_decay_schedule(opt.learning_rate, decay_steps=steps)
  if opt.schedule == "warmup_cosine":
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=opt.learning_rate, warmup_steps=opt.warmup_steps,
        decay_steps=steps, end_value=0.0)
  raise ValueError(f"unknown schedule '{opt.schedule}'")


def make_optimizer(opt: ml_collections.ConfigDict, steps: int
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """Returns (tx, schedule) for a validated `optimizer` config group."""
  schedule = make_schedule(opt, steps)
  parts = []
  if opt.grad_clip_norm > 0:
    parts.append(optax.clip_by_global_norm(opt.grad_clip_norm))
  if opt.name == "sgd":
    if opt.weight_decay:
      parts.append(optax.add_decayed_weights(opt.weight_decay))
    parts.append(optax.sgd(schedule, momentum=opt.momentum or None, nesterov=opt.nesterov))
  elif opt.name == "adam":
    if opt.weight_decay:
      parts.append(optax.add_decayed_weights(opt.weight_decay))
    parts.append(optax.adam(schedule, b1=opt.b1, b2=opt.b2, eps=opt.eps))
  elif opt.name == "adamw":
    parts.append(optax.adamw(schedule, b1=opt.b1, b2=opt.b2, eps=opt.eps,
                             weight_decay=opt.weight_decay))
  else:
    raise ValueError(f"unknown optimizer '{opt.name}'")
  return optax.chain(*parts), schedule
