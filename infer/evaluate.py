"""Perplexity of a trained, quantized or compressed workdir.

  python -m infer.evaluate --workdir=DIR [--data=SOURCE] [--seq_len=N] [--batch_size=B] [--max_tokens=T]

The default protocol is the one of the GPTQ/SparseGPT papers: the validation split is tokenized as one stream
(documents in their fixed order, each preceded by EOT), cut into non-overlapping windows of seq_len tokens, and every
window is scored from its own start; perplexity is exp of the mean next-token NLL over all predicted tokens. It is
deterministic and independent of the batch size. The number is printed and written as JSON (--json, default
DIR/eval.json). `perplexity` scores a model with the packed-batch protocol the trainer logs during training
(`train.validation`).
"""

from __future__ import annotations

import math
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from flax import nnx

from configs import base
from infer import loading
from model import quant
from train import data as data_lib
from train import sft
from train import step as step_lib
from train import validation
from workdir import layout
from workdir import tokenizer as tokenizer_lib
from train import allocator


def perplexity(model, config, tokenizer, num_batches: int | None = None) -> dict[str, float]:
  """`train.validation.validation_loss` of an NNX model (float or quantized) on the validation split of
  `config.data`."""
  graphdef, state = nnx.split(model)
  source = data_lib.load_sources(config)["validation"]
  return validation.validation_loss(step_lib.jit_eval_step(graphdef), state, config, source, tokenizer, num_batches)


# -- the papers' protocol: one token stream, non-overlapping windows ----------------------------------------------------


def token_stream(source, tokenizer, max_tokens: int | None = None) -> np.ndarray:
  """BOS (EOT for our tokenizers) + tokens of every document of `source` in order, concatenated: [n] int32 (cut at max_tokens if given)."""
  pieces, total = [], 0
  for i in range(len(source)):
    ids = np.asarray(tokenizer_lib.encode_document(tokenizer, source[i]["text"]), np.int32)
    pieces.append(ids)
    total += len(ids)
    if max_tokens and total >= max_tokens:
      break
  tokens = np.concatenate(pieces) if pieces else np.zeros(0, np.int32)
  return tokens[:max_tokens] if max_tokens else tokens


def make_window_nll(model):
  """A jitted fn(params, windows [B, L] int32) -> summed next-token NLL [B] float32 of each window (L - 1 targets)."""
  graphdef, _ = nnx.split(model)

  @jax.jit
  def window_nll(params, windows):
    logits = nnx.merge(graphdef, params)(windows[:, :-1])
    nll, _ = step_lib.token_losses(logits, windows[:, 1:])
    return nll.sum(axis=1)

  return window_nll


def stream_perplexity(model, tokens: np.ndarray, seq_len: int, batch_size: int = 8, window_nll=None) -> dict:
  """Perplexity of `model` on `tokens` [n] cut into floor(n / seq_len) windows of seq_len (the remainder dropped).

  Each window predicts its tokens 1..seq_len-1 from its own prefix. Batches of `batch_size` windows; the last batch
  is padded with repeated windows whose scores are discarded, so the result does not depend on batch_size (except
  for MoE models with capacity_factor > 0, whose dropped tokens depend on what shares a batch). Returns
  {"loss", "ppl", "tokens", "windows", "seq_len"}."""
  if seq_len < 2 or seq_len - 1 > model.spec.max_len:  # the model reads seq_len - 1 tokens of each window
    raise ValueError(f"seq_len={seq_len} must be in [2, model max_len + 1={model.spec.max_len + 1}]")
  count = len(tokens) // seq_len
  if count == 0:
    raise ValueError(f"{len(tokens)} tokens are fewer than one window of seq_len={seq_len}")
  windows = np.asarray(tokens[:count * seq_len], np.int32).reshape(count, seq_len)
  window_nll = window_nll or make_window_nll(model)
  params = nnx.state(model)
  total = 0.0
  for s in range(0, count, batch_size):
    batch = windows[s:s + batch_size]
    real = len(batch)
    if real < batch_size:
      batch = np.concatenate([batch, np.repeat(batch[-1:], batch_size - real, axis=0)])
    total += float(np.sum(np.asarray(window_nll(params, jnp.asarray(batch)), np.float64)[:real]))
  predicted = count * (seq_len - 1)
  loss = total / predicted
  return {"loss": loss, "ppl": math.exp(min(loss, 50.0)), "tokens": predicted, "windows": count, "seq_len": seq_len}


def validation_stream(config, tokenizer, max_tokens: int | None = None) -> np.ndarray:
  """The validation split of `config.data.source` as one token stream (see `token_stream`)."""
  if sft.is_sft(config):
    raise ValueError(f"data.source={config.data.source!r} holds fine-tuning records, not a text stream: score text "
                     "with --data='files:...' (or 'stdlib'); the run's metrics.jsonl has its answer-only eval loss")
  return token_stream(data_lib.load_sources(config)["validation"], tokenizer, max_tokens)


def main(argv):
  del argv
  f = flags.FLAGS
  try:
    config, model, tokenizer, step = loading.load_trained(f.workdir, head_quant=f.head_quant, adapter=f.adapter)
  except (FileNotFoundError, ValueError) as e:
    sys.exit(f"error: cannot load --workdir={f.workdir}: {e}")
  if f.data:
    config.data.source = f.data
  seq_len = f.seq_len or config.data.seq_len
  try:
    tokens = validation_stream(config, tokenizer, f.max_tokens or None)
    result = stream_perplexity(model, tokens, seq_len, f.batch_size)
  except (FileNotFoundError, ValueError) as e:
    sys.exit(f"error: {e}")
  result.update(workdir=os.path.abspath(f.workdir), step=step, data=config.data.source, quant=config.model.quant)
  print(loading.weights_note(model))
  result["weight_bytes"] = quant.nbytes(nnx.state(model, nnx.Param))
  note = loading.compression_note(f.workdir)
  if note:
    print(note)
    result["compression"] = note
  print(f"{f.workdir} (step {step}): validation loss {result['loss']:.4f}, perplexity {result['ppl']:.2f} over "
        f"{result['tokens']} predicted tokens ({result['windows']} windows of {seq_len}) of {config.data.source}")
  layout.write_json(f.json or layout.path(f.workdir, "eval.json"), result, indent=2)


if __name__ == "__main__":
  allocator.reexec_with_tcmalloc("infer.evaluate")  # XLA CPU temporaries without page faults (train/allocator.py)
  flags.DEFINE_string("workdir", None, "Training, quantized or compressed run directory.", required=True)
  flags.DEFINE_string("data", "", "Data source whose validation split is scored (default: the run's data.source).")
  flags.DEFINE_integer("seq_len", 0, "Window length (default: the run's data.seq_len).")
  flags.DEFINE_integer("batch_size", 8, "Windows per forward pass (does not change the result).")
  flags.DEFINE_integer("max_tokens", 0, "Score only the first this many validation tokens (0: all).")
  flags.DEFINE_string("adapter", None, "A LoRA adapter over --workdir: a PEFT directory (adapter_config.json) or a "
                      "LoRA training run; merged into float bases at load.")
  flags.DEFINE_enum("head_quant", None, list(base.HEAD_QUANTS), "Serve a packed compressed workdir's float embedding and head as int8 rows (smaller, faster; not lossless).")
  flags.DEFINE_string("json", "", "Where to write the result (default: WORKDIR/eval.json).")
  app.run(main)
