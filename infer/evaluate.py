"""Held-out perplexity of a trained (or quantized) workdir on its validation split.

  python -m infer.evaluate --workdir=DIR [--batches=N]
"""

from __future__ import annotations

import math
import sys

import jax
from flax import nnx

from train import data as data_lib
from train import step as step_lib


def validation_loss(eval_fn, params, config, source, tokenizer, num_batches: int | None = None) -> dict[str, float]:
  """Mean NLL per real token, and its exp, over the first `num_batches` (default train.eval_batches) batches of the
  validation `source`: always the same tokens, so runs and formats compare exactly. `eval_fn(params, batch)` returns
  {"nll_sum", "weight_sum"} (see `train.step.eval_step`)."""
  iterator = data_lib.make_iterator(config, source, tokenizer, split="validation",
                                    shard_index=jax.process_index(), shard_count=jax.process_count())
  nll = weight = 0.0
  for _ in range(num_batches or config.train.eval_batches):
    out = eval_fn(params, next(iterator))
    nll += float(out["nll_sum"])
    weight += float(out["weight_sum"])
  if hasattr(iterator, "close"):
    iterator.close()
  loss = nll / max(weight, 1.0)
  return {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 50.0)), "eval_tokens": weight}


def perplexity(model, config, tokenizer, num_batches: int | None = None) -> dict[str, float]:
  """`validation_loss` of an NNX model (float or quantized) on the validation split of `config.data`."""
  graphdef, state = nnx.split(model)
  source = data_lib.load_sources(config)["validation"]
  return validation_loss(step_lib.jit_eval_step(graphdef), state, config, source, tokenizer, num_batches)


def main(argv):
  from absl import flags

  from infer import loading

  del argv
  f = flags.FLAGS
  try:
    config, model, tokenizer, step = loading.load_trained(f.workdir)
  except (FileNotFoundError, ValueError) as e:
    sys.exit(f"error: cannot load --workdir={f.workdir}: {e}")
  result = perplexity(model, config, tokenizer, f.batches)
  print(f"{f.workdir} (step {step}, quant={config.model.quant}): held-out loss {result['eval_loss']:.4f}, "
        f"perplexity {result['eval_ppl']:.2f} over {int(result['eval_tokens'])} tokens")


if __name__ == "__main__":
  from absl import app, flags

  flags.DEFINE_string("workdir", None, "Training or quantized run directory.", required=True)
  flags.DEFINE_integer("batches", None, "Validation batches (default: the run's train.eval_batches).")
  app.run(main)
