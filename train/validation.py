"""The validation loss the trainer logs: packed batches of the validation split, always the same tokens.

(`infer.evaluate` holds the papers' stream-perplexity protocol for finished models.)
"""

from __future__ import annotations

import math

import jax

from train import data as data_lib


def validation_loss(eval_fn, params, config, source, tokenizer, num_batches: int | None = None,
                    to_global=None) -> dict[str, float]:
  """Mean NLL per real token, and its exp, over the first `num_batches` (default train.eval_batches) batches of the
  validation `source`: always the same tokens, so runs and formats compare exactly. `eval_fn(params, batch)` returns
  {"nll_sum", "weight_sum"} (see `train.step.eval_step`); `to_global` turns this process's rows into global arrays
  in multi-process runs."""
  iterator = data_lib.make_iterator(config, source, tokenizer, split="validation",
                                    shard_index=jax.process_index(), shard_count=jax.process_count())
  nll = weight = 0.0
  for _ in range(num_batches or config.train.eval_batches):
    batch = next(iterator)
    out = eval_fn(params, to_global(batch) if to_global else batch)
    nll += float(out["nll_sum"])
    weight += float(out["weight_sum"])
  if hasattr(iterator, "close"):
    iterator.close()
  loss = nll / max(weight, 1.0)
  return {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 50.0)), "eval_tokens": weight}
