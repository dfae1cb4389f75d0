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
from train import checkpoint, step as step_lib, tokenizer as tokenizer_lib


def load_trained(workdir: str, step: int | None = None, matmul_impl: str | None = None,
                 attention_impl: str | None = None):
  """Returns (config, model, tokenizer, step) for the latest (or given) checkpoint of `workdir`.

  `matmul_impl` overrides the run's model.matmul_impl (`pallas` on a QMoE workdir decodes the experts inside the
  fused kernel during generation; the returned model is then unstacked and carries the coded weights);
  `attention_impl` overrides model.attention_impl."""
  config = checkpoint.load_config(workdir)
  if matmul_impl:
    config.model.matmul_impl = matmul_impl
  if attention_impl:
    config.model.attention_impl = attention_impl
  spec = ModelSpec.from_config(config.model)
  abstract_params = jax.eval_shape(lambda: step_lib.init_params(spec, 0))
  if storage.is_compressed(workdir):  # infer.compress output: packed codes are dequantized into the float model
    params, step, meta = storage.load_params(workdir, abstract_params, step)
    model = nnx.merge(step_lib.model_graphdef(spec), params)
    if "coded_arrays" in meta and spec.matmul_impl == "pallas":
      model = _attach_coded(model, meta)
    return config, model, load_tokenizer(workdir), step
  params, step = checkpoint.restore_params(workdir, abstract_params, step)  # train states, imports, int8 models
  model = nnx.merge(step_lib.model_graphdef(spec), params)
  return config, model, load_tokenizer(workdir), step


def _attach_coded(model, meta: dict):
  """Unstacks a QMoE model and gives each MoE block its coded expert streams (see `model.moe.CodedExperts`)."""
  from model import moe

  model = model.unstacked()
  per_block: dict[tuple[int, int], dict] = {}
  for key, w in meta["qmoe"]["weights"].items():
    c = meta["coded_arrays"][key]
    per_block.setdefault((w["unit"], w["layer"]), {})[w["name"]] = (
        jnp.asarray(c["codes"]).astype(jnp.int32), jnp.asarray(c["offsets"]), jnp.asarray(c["lo"]).reshape(-1),
        jnp.asarray(c["hi"]).reshape(-1))
  for (unit, layer), coded in per_block.items():
    coded["dictionary"] = tuple(jnp.asarray(a).astype(jnp.int32) for a in meta["dictionary_arrays"])
    model.blocks[unit].layers[layer].moe.coded = nnx.data(moe.CodedExperts(coded))
  return model


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
  return tokenizer_lib.load(path)


def as_model(spec: ModelSpec, params) -> Transformer:
  """Rebuilds a Transformer from a spec and a pure parameter dict."""
  return nnx.merge(step_lib.model_graphdef(spec), params)
