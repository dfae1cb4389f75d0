"""Loads what a training run left in its workdir: config, model with the latest parameters, tokenizer."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import tokenizers
from flax import nnx

from infer.compress import storage
from model.transformer import ModelSpec, Transformer
from train import checkpoint, optim, step as step_lib


def load_trained(workdir: str, step: int | None = None):
  """Returns (config, model, tokenizer, step) for the latest (or given) checkpoint of `workdir`."""
  config = checkpoint.load_config(workdir)
  spec = ModelSpec.from_config(config.model)
  abstract_params = jax.eval_shape(lambda: step_lib.init_params(spec, 0))
  if storage.is_compressed(workdir):  # infer.compress output: packed codes are dequantized into the float model
    params, step, _ = storage.load_params(workdir, abstract_params, step)
    return config, nnx.merge(step_lib.model_graphdef(spec), params), load_tokenizer(workdir), step
  if spec.quant != "none":  # quantized workdirs (scripts/quantize.py) hold parameters only
    abstract_state = {"step": jax.ShapeDtypeStruct((), jnp.int32), "params": abstract_params}
  else:
    optimizer = optim.make_optimizer(config.train, abstract_params)
    abstract_state = jax.eval_shape(lambda: step_lib.init_state(spec, optimizer, 0))
  state, step = checkpoint.restore_state(workdir, abstract_state, step)
  model = nnx.merge(step_lib.model_graphdef(spec), state["params"])
  return config, model, load_tokenizer(workdir), step


def compression_note(workdir: str) -> str | None:
  """One line on how a compressed workdir was made (method, sparsity, bits per weight), or None for other workdirs."""
  if not storage.is_compressed(workdir):
    return None
  with open(os.path.join(workdir, storage.METADATA), encoding="utf-8") as f:
    meta = json.load(f)
  s = meta["summary"]
  return (f"compressed with {meta['label']}: sparsity {s['sparsity']:.1%} and {s['bits_per_weight']:.2f} bits per "
          f"weight over {s['compressed_params']:,} {s.get('scope', 'block weights (embeddings, head and norms stay float)')}")


def load_tokenizer(workdir: str) -> tokenizers.Tokenizer:
  path = os.path.join(workdir, "tokenizer.json")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} not found: --workdir must be a directory written by `python -m train`")
  return tokenizers.Tokenizer.from_file(path)


def as_model(spec: ModelSpec, params) -> Transformer:
  """Rebuilds a Transformer from a spec and a pure parameter dict."""
  return nnx.merge(step_lib.model_graphdef(spec), params)
