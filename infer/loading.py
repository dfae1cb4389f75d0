"""Loads a workdir for inference: its config, the model with the latest (or a given) checkpoint, and its tokenizer.

Trained runs, Hugging Face imports and int8 workdirs hold plain parameter checkpoints; compressed workdirs
(`infer.compress`, QMoE) are read through `infer.compress.storage`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from infer.compress import storage
from model import moe
from model import transformer
from model.transformer import ModelSpec
from workdir import checkpoint
from workdir import layout
from workdir import tokenizer as tokenizer_lib


def load_trained(workdir: str, step: int | None = None, matmul_impl: str | None = None,
                 attention_impl: str | None = None):
  """Returns (config, model, tokenizer, step) for the latest (or given) checkpoint of `workdir`.

  `matmul_impl` overrides the run's model.matmul_impl (`pallas` on a QMoE workdir decodes the experts inside the
  fused kernel during generation; the returned model is then unstacked and carries the coded weights);
  `attention_impl` overrides model.attention_impl."""
  config = layout.load_config(workdir)
  if matmul_impl:
    config.model.matmul_impl = matmul_impl
  if attention_impl:
    config.model.attention_impl = attention_impl
  spec = ModelSpec.from_config(config.model)
  abstract_params = jax.eval_shape(lambda: transformer.init_params(spec, 0))
  if layout.is_compressed(workdir):  # infer.compress output: packed codes are dequantized into the float model
    params, step, meta = storage.load_params(workdir, abstract_params, step)
    model = transformer.from_params(spec, params)
    if "coded_arrays" in meta and spec.matmul_impl == "pallas":
      model = _attach_coded(model, meta)
    return config, model, tokenizer_lib.load_from(workdir), step
  params, step = checkpoint.restore_params(workdir, abstract_params, step)  # train states, imports, int8 models
  return config, transformer.from_params(spec, params), tokenizer_lib.load_from(workdir), step


def _attach_coded(model, meta: dict):
  """Unstacks a QMoE model and gives each MoE block its coded expert streams (see `model.moe.CodedExperts`)."""
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
  if not layout.is_compressed(workdir):
    return None
  meta = layout.read_json(layout.path(workdir, layout.COMPRESSION))
  s = meta["summary"]
  return (f"compressed with {meta['label']}: sparsity {s['sparsity']:.1%} and {s['bits_per_weight']:.2f} bits per "
          f"weight over {s['compressed_params']:,} {s.get('scope', 'block weights (embeddings, head and norms stay float)')}")
