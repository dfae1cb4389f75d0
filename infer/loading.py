"""Loads a workdir for inference: its config, the model with the latest (or a given) checkpoint, and its tokenizer.

Trained runs, Hugging Face imports and int8 workdirs hold plain parameter checkpoints; compressed workdirs
(`infer.compress`, QMoE) are read through `infer.compress.storage`: quantized codes are served as stored
(`model.quant=packed`) where the packed kernels take them, else dequantized into the float model (the load says so).
"""

from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp
from flax import nnx

from configs import base
from infer.compress import storage
from model import lora
from model import moe
from model.kernels import ternary_matvec as tm
from model import peft
from model import quant
from model import transformer
from model.transformer import ModelSpec
from workdir import checkpoint
from workdir import layout
from workdir import tokenizer as tokenizer_lib


def load_trained(workdir: str, step: int | None = None, matmul_impl: str | None = None,
                 attention_impl: str | None = None, dequantize: bool = False, head_quant: str | None = None,
                 adapter: str | None = None, merge_lora: bool = True):
  """Returns (config, model, tokenizer, step) for the latest (or given) checkpoint of `workdir`, with a LoRA
  adapter when `adapter` names one (see `with_adapter`).

  `matmul_impl` overrides the run's model.matmul_impl (`pallas` on a QMoE workdir decodes the experts inside the
  fused kernel during generation; the returned model is then unstacked and carries the coded weights);
  `attention_impl` overrides model.attention_impl; `dequantize` loads a compressed workdir's codes into the float
  model instead of serving them as stored (the reference the packed kernels are tested against); `head_quant="int8"`
  serves a packed workdir's float embedding and head as int8 rows (quantized here; any other workdir refuses it).
  A LoRA training run loads as its base with its adapters: merged into float bases (`merge_lora`, no cost per
  token), beside quantized (QLoRA) ones."""
  config, model, tokenizer, step = _load(workdir, step, matmul_impl, attention_impl, dequantize, head_quant, merge_lora)
  if adapter:
    model = with_adapter(model, adapter, merge_lora)
  return config, model, tokenizer, step


def read_adapter(adapter: str, float_spec: ModelSpec) -> tuple[ModelSpec, dict]:
  """(LoRA spec, adapter tree) of `adapter`: a PEFT directory (adapter_config.json) or a LoRA training run."""
  if os.path.isfile(os.path.join(adapter, peft.CONFIG)):
    return peft.load_adapter(adapter, float_spec)
  if os.path.isfile(layout.path(adapter, layout.CONFIG)) and layout.load_config(adapter).train.lora.rank:
    config = layout.load_config(adapter)
    lora_spec = ModelSpec.from_config(config.model, config.train.lora)
    abstract = lora.split(jax.eval_shape(lambda: transformer.init_params(lora_spec, 0)))[0]
    return lora_spec, checkpoint.restore_items(adapter, {"params": abstract})[0]["params"]
  raise FileNotFoundError(f"adapter {adapter} is neither a PEFT LoRA directory ({peft.CONFIG}) nor a LoRA training "
                          "workdir (config.json with train.lora.rank > 0)")


def _base_params(model, adapter: str) -> dict:
  if model.spec.lora_rank:
    raise ValueError(f"adapter {adapter}: the model already carries an adapter (a LoRA run); load its base")
  return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def _check_fits(spec: ModelSpec, adapters: dict, adapter: str) -> None:
  expected = lora.split(jax.eval_shape(lambda: transformer.init_params(spec, 0)))[0]
  if jax.tree.map(lambda a: a.shape, expected) != jax.tree.map(lambda a: a.shape, adapters):
    raise ValueError(f"adapter {adapter}: its shapes do not fit this model (made for another base model?)")


def with_adapter(model, adapter: str, merge: bool = True):
  """`model` with the LoRA adapter of `adapter` (see `read_adapter`) over this base: merged into a float base when
  `merge`, else (and for quantized bases) run beside it."""
  base_params = _base_params(model, adapter)
  lora_spec, adapters = read_adapter(adapter, lora.base_spec(model.spec))
  spec = dataclasses.replace(model.spec, lora_rank=lora_spec.lora_rank, lora_alpha=lora_spec.lora_alpha,
                             lora_targets=lora_spec.lora_targets)
  _check_fits(spec, adapters, adapter)
  params = lora.combine(adapters, base_params)
  if merge and spec.quant == "none":
    return transformer.from_params(lora.base_spec(spec), lora.merge(spec, params))
  return transformer.from_params(spec, params)


def with_adapter_bank(model, adapters: list[str]):
  """`model` with several LoRA adapters over its base at bank indices 1..n (`lora.bank`), for the serving engine to
  pick one per request (index 0: the base model)."""
  base_params = _base_params(model, ",".join(adapters))
  float_spec = lora.base_spec(model.spec)
  named = []
  for path in adapters:
    lora_spec, tree = read_adapter(path, float_spec)
    _check_fits(dataclasses.replace(model.spec, lora_rank=lora_spec.lora_rank, lora_targets=lora_spec.lora_targets),
                tree, path)
    named.append((lora_spec, tree))
  fields, bank = lora.bank(named)
  return transformer.from_params(dataclasses.replace(model.spec, **fields), lora.combine(bank, base_params))


def _load(workdir, step, matmul_impl, attention_impl, dequantize, head_quant, merge_lora):
  config = layout.load_config(workdir)
  if matmul_impl:
    config.model.matmul_impl = matmul_impl
  if attention_impl:
    config.model.attention_impl = attention_impl
  if config.train.lora.rank:  # a LoRA (QLoRA) training run: adapters and the frozen base
    _refuse_head_quant(head_quant, workdir, "is a LoRA run")
    spec = ModelSpec.from_config(config.model, config.train.lora)
    adapters, frozen = lora.split(jax.eval_shape(lambda: transformer.init_params(spec, 0)))
    items, step = checkpoint.restore_items(workdir, {"params": adapters, "frozen": frozen}, step)
    params = lora.combine(items["params"], items["frozen"])
    if merge_lora and spec.quant == "none":
      return config, transformer.from_params(lora.base_spec(spec), lora.merge(spec, params)), \
          tokenizer_lib.load_from(workdir), step
    return config, transformer.from_params(spec, params), tokenizer_lib.load_from(workdir), step
  spec = ModelSpec.from_config(config.model)
  abstract_params = jax.eval_shape(lambda: transformer.init_params(spec, 0))
  if layout.is_compressed(workdir):
    meta = layout.read_json(layout.path(workdir, layout.COMPRESSION))
    fields = None if dequantize else storage.packed_fields(meta, spec, abstract_params)
    if fields:  # served as stored: uint8 codes plus scale and zero point, no float copy
      config.model.update(fields)
      spec = ModelSpec.from_config(config.model)
      params, step = storage.load_packed(workdir, jax.eval_shape(lambda: transformer.init_params(spec, 0)), step)
      if head_quant and head_quant != "none":
        config.model.head_quant = head_quant
        base.validate(config)
        spec = ModelSpec.from_config(config.model)
        params = quant.quantize_head(params, spec.tie_embeddings)
      return config, transformer.from_params(spec, params), tokenizer_lib.load_from(workdir), step
    _refuse_head_quant(head_quant, workdir, "is loaded as a float model (dequantized, QMoE or MoE)")
    params, step, meta = storage.load_params(workdir, abstract_params, step)
    model = transformer.from_params(spec, params)
    if "coded_arrays" in meta and spec.matmul_impl == "pallas":
      model = _attach_coded(model, meta)
    return config, model, tokenizer_lib.load_from(workdir), step
  _refuse_head_quant(head_quant, workdir, f"holds model.quant={spec.quant!r}" +
                     (" (int8 formats already hold an int8 head)" if spec.quant != "none" else ""))
  params, step = checkpoint.restore_params(workdir, abstract_params, step)  # train states, imports, int8 models
  return config, transformer.from_params(spec, params), tokenizer_lib.load_from(workdir), step


def _refuse_head_quant(head_quant: str | None, workdir: str, why: str) -> None:
  if head_quant and head_quant != "none":
    raise ValueError(f"--head_quant={head_quant} applies to compressed workdirs served packed (model.quant=packed); "
                     f"{workdir} {why}")


def _attach_coded(model, meta: dict):
  """Unstacks a QMoE model and gives each MoE block its coded expert streams (see `model.moe.CodedExperts`)."""
  model = model.unstacked()
  per_block: dict[tuple[int, int], dict] = {}
  for key, w in meta["qmoe"]["weights"].items():
    c = meta["coded_arrays"][key]
    codes = tm.align_stream(jnp.asarray(c["codes"]).astype(jnp.int32))  # TPU DMA windows: see ternary_matvec
    per_block.setdefault((w["unit"], w["layer"]), {})[w["name"]] = (
        codes, jnp.asarray(c["offsets"]), jnp.asarray(c["lo"]).reshape(-1), jnp.asarray(c["hi"]).reshape(-1))
  for (unit, layer), coded in per_block.items():
    coded["dictionary"] = tuple(jnp.asarray(a).astype(jnp.int32) for a in meta["dictionary_arrays"])
    model.blocks[unit].layers[layer].moe.coded = nnx.data(moe.CodedExperts(coded))
  return model


def weights_note(model) -> str:
  """One line on the weights a loaded model holds in memory: their format and resident bytes (what a decode step
  reads)."""
  spec = model.spec
  fmt = {"none": spec.param_dtype, "int8_weight": "int8 W8A16", "w8a8": "int8 W8A8",
         "packed": f"{spec.quant_bits}-bit codes (group {spec.quant_group_size or 'per channel'}) as stored"}[spec.quant]
  if spec.head_quant != "none":
    fmt += f", {spec.head_quant} embedding and head"
  return f"weights: {fmt}, {quant.nbytes(nnx.state(model, nnx.Param)) / 1e6:,.1f} MB resident"


def compression_note(workdir: str) -> str | None:
  """One line on how a compressed workdir was made (method, sparsity, bits per weight), or None for other workdirs."""
  if not layout.is_compressed(workdir):
    return None
  meta = layout.read_json(layout.path(workdir, layout.COMPRESSION))
  s = meta["summary"]
  return (f"compressed with {meta['label']}: sparsity {s['sparsity']:.1%} and {s['bits_per_weight']:.2f} bits per "
          f"weight over {s['compressed_params']:,} {s.get('scope', 'block weights (embeddings, head and norms stay float)')}")
