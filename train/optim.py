"""Optimizers and learning-rate schedules from `config.train`, built from optax parts."""

from __future__ import annotations

from typing import Any

import jax
import optax

# Weight decay applies to matmul weights only (named w* in blocks, or the untied output head); never to biases,
# norm scales or embeddings.
_DECAYED_PREFIX = "w"
_DECAYED_NAMES = ("head",)


def make_schedule(t) -> optax.Schedule:
  """Linear warmup to `learning_rate`, then cosine / linear decay to `min_lr_ratio * learning_rate`, or constant."""
  peak, end = t.learning_rate, t.learning_rate * t.min_lr_ratio
  decay_steps = max(t.steps - t.warmup_steps, 1)
  if t.schedule == "cosine":
    decay = optax.cosine_decay_schedule(peak, decay_steps, alpha=t.min_lr_ratio)
  elif t.schedule == "linear":
    decay = optax.linear_schedule(peak, end, decay_steps)
  else:
    decay = optax.constant_schedule(peak)
  warmup = optax.linear_schedule(0.0, peak, t.warmup_steps) if t.warmup_steps else None
  if warmup is None:
    return decay
  return optax.join_schedules([warmup, decay], [t.warmup_steps])


def weight_decay_mask(params: Any) -> Any:
  """Pytree of bools matching `params` (a nested dict): True where weight decay applies."""

  def decayed(path, _):
    name = str(getattr(path[-1], "key", path[-1]))
    return name.startswith(_DECAYED_PREFIX) or name in _DECAYED_NAMES

  return jax.tree_util.tree_map_with_path(decayed, params)


def make_optimizer(t, params: Any) -> optax.GradientTransformation:
  """Global-norm clipping followed by AdamW, Adafactor or Lion with the schedule and decay mask from `config.train`."""
  schedule = make_schedule(t)
  mask = weight_decay_mask(params)
  if t.optimizer == "adamw":
    opt = optax.adamw(schedule, b1=t.b1, b2=t.b2, eps=t.eps, weight_decay=t.weight_decay, mask=mask)
  elif t.optimizer == "lion":
    opt = optax.lion(schedule, b1=t.b1, b2=t.b2, weight_decay=t.weight_decay, mask=mask)
  elif t.optimizer == "adafactor":
    # optax.adafactor adds its weight decay after the learning rate (p <- p - wd * p per step, even at lr 0);
    # build the same factored update with decay before the learning rate, like AdamW and Lion.
    opt = optax.chain(optax.scale_by_factored_rms(), optax.scale_by_param_block_rms(),
                      optax.add_decayed_weights(t.weight_decay, mask), optax.scale_by_learning_rate(schedule))
  else:
    raise ValueError(f"config.train.optimizer={t.optimizer!r} is invalid: use adamw, adafactor or lion")
  if t.grad_clip > 0:
    opt = optax.chain(optax.clip_by_global_norm(t.grad_clip), opt)
  return opt
