"""Optimizers and learning-rate schedules from `config.train`, built from optax parts."""

from __future__ import annotations

from typing import Any

import jax
import optax

from configs import base

# Weight decay applies to matmul weights only (named w* in blocks, or the untied output head); never to biases,
# norm scales or embeddings.
_DECAYED_PREFIX = "w"
_DECAYED_NAMES = ("head",)


SCHEDULES = {  # train.schedule -> fn(config.train, decay_steps) -> the schedule after warm-up
    "cosine": lambda t, steps: optax.cosine_decay_schedule(t.learning_rate, steps, alpha=t.min_lr_ratio),
    "linear": lambda t, steps: optax.linear_schedule(t.learning_rate, t.learning_rate * t.min_lr_ratio, steps),
    "constant": lambda t, steps: optax.constant_schedule(t.learning_rate),
}
base.check_implemented("train.schedule", base.SCHEDULES, SCHEDULES)


def make_schedule(t) -> optax.Schedule:
  """Linear warmup to `learning_rate`, then cosine / linear decay to `min_lr_ratio * learning_rate`, or constant."""
  decay = SCHEDULES[t.schedule](t, max(t.steps - t.warmup_steps, 1))
  if not t.warmup_steps:
    return decay
  return optax.join_schedules([optax.linear_schedule(0.0, t.learning_rate, t.warmup_steps), decay], [t.warmup_steps])


def weight_decay_mask(params: Any) -> Any:
  """Pytree of bools matching `params` (a nested dict): True where weight decay applies."""

  def decayed(path, _):
    name = str(getattr(path[-1], "key", path[-1]))
    return name.startswith(_DECAYED_PREFIX) or name in _DECAYED_NAMES

  return jax.tree_util.tree_map_with_path(decayed, params)


def _adafactor(t, schedule, mask) -> optax.GradientTransformation:
  # optax.adafactor adds its weight decay after the learning rate (p <- p - wd * p per step, even at lr 0);
  # build the same factored update with decay before the learning rate, like AdamW and Lion.
  return optax.chain(optax.scale_by_factored_rms(), optax.scale_by_param_block_rms(),
                     optax.add_decayed_weights(t.weight_decay, mask), optax.scale_by_learning_rate(schedule))


OPTIMIZERS = {  # train.optimizer -> fn(config.train, schedule, decay mask) -> the update rule
    "adamw": lambda t, schedule, mask: optax.adamw(schedule, b1=t.b1, b2=t.b2, eps=t.eps, weight_decay=t.weight_decay,
                                                   mask=mask),
    "lion": lambda t, schedule, mask: optax.lion(schedule, b1=t.b1, b2=t.b2, weight_decay=t.weight_decay, mask=mask),
    "adafactor": _adafactor,
}
base.check_implemented("train.optimizer", base.OPTIMIZERS, OPTIMIZERS)


def make_optimizer(t, params: Any) -> optax.GradientTransformation:
  """Global-norm clipping followed by AdamW, Adafactor or Lion with the schedule and decay mask from `config.train`."""
  schedule = make_schedule(t)
  opt = OPTIMIZERS[t.optimizer](t, schedule, weight_decay_mask(params))
  if t.grad_clip > 0:
    opt = optax.chain(optax.clip_by_global_norm(t.grad_clip), opt)
  return opt
