"""Hugging Face interop: `load_pretrained` reads a Hugging Face model directory (config.json + safetensors, sharded
index included) into our `Transformer`; `save_pretrained` writes one that `transformers` loads.

Architectures: GPT-2 (`GPT2LMHeadModel`), OPT (`OPTForCausalLM`, post-norm and projected embeddings included),
Llama and Mistral (`LlamaForCausalLM`, `MistralForCausalLM`: grouped-query attention, rope_theta, llama3 RoPE
scaling, attention and MLP biases, tied or untied heads) and Mixtral (`MixtralForCausalLM`, top-k sparse MoE).

Each architecture is a table of `Rule`s, one per parameter of ours, read in both directions. Loading streams: one
parameter at a time is assembled on the host from its Hugging Face tensors (one per layer, or per layer and
expert) and placed straight onto its target sharding, so host memory peaks at one stacked parameter and a model
larger than one device loads onto a mesh.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import tempfile
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from safetensors import safe_open
from safetensors.flax import save_file  # takes bfloat16, which the numpy writer cannot

from configs import base
from model import sharding
from model.transformer import ModelSpec, Transformer

ARCHITECTURES = {"gpt2": "GPT2LMHeadModel", "opt": "OPTForCausalLM", "llama": "LlamaForCausalLM",
                 "mistral": "MistralForCausalLM", "mixtral": "MixtralForCausalLM"}
_ACTIVATIONS = {"gelu_new": "gelu", "gelu_pytorch_tanh": "gelu", "gelu_fast": "gelu", "gelu": "gelu_exact",
                "relu": "relu", "silu": "silu", "swish": "silu"}
_HF_ACTIVATION = {"gelu": "gelu_new", "gelu_exact": "gelu", "relu": "relu", "silu": "silu"}
_BUFFERS = (".attn.bias", ".attn.masked_bias", "rotary_emb.inv_freq")  # non-parameter tensors older files carry
_OPT_POSITION_OFFSET = 2  # OPT's learned position table starts at row 2


class UnsupportedModelError(ValueError):
  """A Hugging Face config whose architecture or options this module cannot represent exactly."""


# -- configs -----------------------------------------------------------------------------------------------------

def read_config(hf_dir: str) -> dict:
  path = os.path.join(hf_dir, "config.json")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} not found: --from_hf must be a Hugging Face model directory")
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def _refuse(hf: dict, key: str, allowed: str):
  raise UnsupportedModelError(f"{hf.get('model_type')} config option {key}={hf.get(key)!r} is not supported: {allowed}")


def _rope(hf: dict) -> dict:
  """RoPE settings of a Llama-style config (transformers 5 `rope_parameters` or the older rope_theta/rope_scaling)."""
  params = dict(hf.get("rope_parameters") or {})
  scaling = hf.get("rope_scaling") or {}
  params = {**scaling, **params}
  theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
  kind = params.get("rope_type", params.get("type", "default")) or "default"
  out = {"rope_theta": float(theta)}
  if kind == "default":
    return {**out, "rope_scaling": "none"}
  if kind != "llama3":
    raise UnsupportedModelError(f"{hf.get('model_type')} rope scaling {kind!r} is not supported: use default or llama3")
  return {**out, "rope_scaling": "llama3", "rope_scaling_factor": float(params["factor"]),
          "rope_low_freq_factor": float(params["low_freq_factor"]),
          "rope_high_freq_factor": float(params["high_freq_factor"]),
          "rope_original_max_len": int(params["original_max_position_embeddings"])}


def model_overrides(hf: dict) -> dict:
  """Our `config.model` keys for a Hugging Face config dict; UnsupportedModelError names what cannot be matched."""
  kind = hf.get("model_type")
  if kind not in ARCHITECTURES:
    raise UnsupportedModelError(f"model_type={kind!r} (architectures {hf.get('architectures')}) is not supported: "
                                f"supported are {', '.join(ARCHITECTURES)}")
  if kind == "gpt2":
    if hf.get("scale_attn_by_inverse_layer_idx"):
      _refuse(hf, "scale_attn_by_inverse_layer_idx", "only False")
    if not hf.get("scale_attn_weights", True):
      _refuse(hf, "scale_attn_weights", "only True")
    if hf.get("add_cross_attention"):
      _refuse(hf, "add_cross_attention", "decoder-only models only")
    act = hf.get("activation_function", "gelu_new")
    if act not in _ACTIVATIONS:
      _refuse(hf, "activation_function", f"one of {', '.join(_ACTIVATIONS)}")
    d = hf["n_embd"]
    return dict(family="gpt", vocab_size=hf["vocab_size"], num_layers=hf["n_layer"], embed_dim=d,
                num_heads=hf["n_head"], mlp_dim=hf.get("n_inner") or 4 * d, max_len=hf["n_positions"],
                activation=_ACTIVATIONS[act], norm_eps=hf.get("layer_norm_epsilon", 1e-5),
                tie_embeddings=hf.get("tie_word_embeddings", True), use_bias=1)
  if kind == "opt":
    if not hf.get("enable_bias", True):
      _refuse(hf, "enable_bias", "only True")
    if not hf.get("layer_norm_elementwise_affine", True):
      _refuse(hf, "layer_norm_elementwise_affine", "only True")
    pre = hf.get("do_layer_norm_before", True)
    if pre and hf.get("_remove_final_layer_norm"):
      _refuse(hf, "_remove_final_layer_norm", "only False with do_layer_norm_before")
    act = hf.get("activation_function", "relu")
    if act not in _ACTIVATIONS:
      _refuse(hf, "activation_function", f"one of {', '.join(_ACTIVATIONS)}")
    d = hf["hidden_size"]
    proj = hf.get("word_embed_proj_dim") or d
    return dict(family="gpt", vocab_size=hf["vocab_size"], num_layers=hf["num_hidden_layers"], embed_dim=d,
                num_heads=hf["num_attention_heads"], mlp_dim=hf["ffn_dim"], max_len=hf["max_position_embeddings"],
                activation=_ACTIVATIONS[act], norm_eps=1e-5, tie_embeddings=hf.get("tie_word_embeddings", True),
                use_bias=1, norm_position="pre" if pre else "post", embed_proj_dim=0 if proj == d else proj)
  # llama, mistral, mixtral
  if hf.get("hidden_act", "silu") not in ("silu", "swish"):
    _refuse(hf, "hidden_act", "only silu (SwiGLU)")
  d, heads = hf["hidden_size"], hf["num_attention_heads"]
  max_len = hf["max_position_embeddings"]
  window = hf.get("sliding_window") if hf.get("use_sliding_window", True) else None
  if window:  # exact for sequences within the window: longer ones are refused by max_len
    max_len = min(max_len, window)
  out = dict(family="llama", vocab_size=hf["vocab_size"], num_layers=hf["num_hidden_layers"], embed_dim=d,
             num_heads=heads, num_kv_heads=hf.get("num_key_value_heads") or heads,
             head_dim=hf.get("head_dim") or d // heads, mlp_dim=hf["intermediate_size"], max_len=max_len,
             norm_eps=hf.get("rms_norm_eps", 1e-6), tie_embeddings=hf.get("tie_word_embeddings", False),
             use_bias=int(bool(hf.get("attention_bias", False))), mlp_bias=int(bool(hf.get("mlp_bias", False))),
             **_rope(hf))
  if kind == "mixtral":
    out.update(num_experts=hf["num_local_experts"], experts_per_token=hf["num_experts_per_tok"],
               expert_mlp_dim=hf["intermediate_size"], moe_every=1, capacity_factor=0.0, moe_renormalize=True)
  return out


def config_from_hf(hf: dict, dtype: str = "float32") -> ml_collections.ConfigDict:
  """A full, validated peakllm config whose model is the Hugging Face one (parameters and compute in `dtype`)."""
  config = base.get_config()
  config.model.update(model_overrides(hf))
  config.model.param_dtype = config.model.dtype = dtype
  config.data.seq_len = min(config.data.seq_len, config.model.max_len)
  config.model.init_std = float(hf.get("initializer_range", hf.get("init_std", 0.02)))
  return base.validate(config)


def architecture_of(spec: ModelSpec, preferred: str | None = None) -> str:
  """The Hugging Face model_type that represents `spec` exactly (`preferred`, e.g. the imported one, when it can:
  Llama-style models without biases export as Mistral just as well); UnsupportedModelError says why none does."""
  if preferred == "mistral" and spec.family == "llama" and not (spec.num_experts or spec.use_bias or spec.has_mlp_bias):
    return "mistral"
  if spec.family == "gpt":
    if spec.num_experts or spec.num_kv_heads != spec.num_heads or not spec.use_bias or not spec.has_mlp_bias:
      raise UnsupportedModelError("gpt-family models export only dense, multi-head, with biases (GPT-2 or OPT)")
    if (preferred == "opt" or spec.activation == "relu" or spec.norm_position == "post"
        or spec.embed_proj_dim not in (0, spec.embed_dim)):
      return "opt"
    return "gpt2"
  if spec.num_experts:
    if spec.moe_every != 1 or not spec.moe_renormalize or spec.use_bias:
      raise UnsupportedModelError("MoE models export as Mixtral only with an MoE MLP in every block "
                                  "(moe_every=1), renormalized top-k gates and no attention biases")
    return "mixtral"
  return "llama"


def hf_config(spec: ModelSpec, model_type: str, extra: dict | None = None) -> dict:
  """The config.json of `spec` as `model_type` (`architecture_of`), plus `extra` keys (e.g. token ids)."""
  dtype = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}[spec.param_dtype]
  common = dict(model_type=model_type, architectures=[ARCHITECTURES[model_type]], vocab_size=spec.vocab_size,
                tie_word_embeddings=spec.tie_embeddings, torch_dtype=dtype, initializer_range=spec.init_std)
  if model_type == "gpt2":
    out = dict(n_embd=spec.embed_dim, n_layer=spec.num_layers, n_head=spec.num_heads, n_inner=spec.mlp_dim,
               n_positions=spec.max_len, activation_function=_HF_ACTIVATION[spec.activation],
               layer_norm_epsilon=spec.norm_eps, n_ctx=spec.max_len)
  elif model_type == "opt":
    out = dict(hidden_size=spec.embed_dim, num_hidden_layers=spec.num_layers, num_attention_heads=spec.num_heads,
               ffn_dim=spec.mlp_dim, max_position_embeddings=spec.max_len,
               activation_function=_HF_ACTIVATION[spec.activation],
               do_layer_norm_before=spec.norm_position == "pre", word_embed_proj_dim=spec.embed_proj_dim or spec.embed_dim,
               enable_bias=True, layer_norm_elementwise_affine=True)
  else:
    rope: dict[str, Any] = {"rope_theta": spec.rope_theta, "rope_type": "default"}
    if spec.rope_scaling == "llama3":
      rope.update(rope_type="llama3", factor=spec.rope_scaling_factor, low_freq_factor=spec.rope_low_freq_factor,
                  high_freq_factor=spec.rope_high_freq_factor,
                  original_max_position_embeddings=spec.rope_original_max_len)
    out = dict(hidden_size=spec.embed_dim, num_hidden_layers=spec.num_layers, num_attention_heads=spec.num_heads,
               num_key_value_heads=spec.num_kv_heads, head_dim=spec.head_dim, intermediate_size=spec.mlp_dim,
               max_position_embeddings=spec.max_len, rms_norm_eps=spec.norm_eps, hidden_act="silu",
               rope_theta=spec.rope_theta, rope_scaling=None if spec.rope_scaling == "none" else
               {k: v for k, v in rope.items() if k != "rope_theta"}, rope_parameters=rope)
    if model_type == "mixtral":
      out.update(num_local_experts=spec.num_experts, num_experts_per_tok=spec.experts_per_token,
                 intermediate_size=spec.expert_mlp_dim, sliding_window=None)
    elif model_type == "mistral":
      out.update(sliding_window=None)  # imports keep max_len within the window, where it changes nothing
    else:
      out.update(attention_bias=spec.use_bias, mlp_bias=spec.has_mlp_bias)
  return {**common, **out, **(extra or {})}


# -- weight tables -----------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Rule:
  """One parameter of ours and where it lives in a Hugging Face checkpoint.

  ours: path in our parameter dict (under "blocks" the leading axis is the layer); hf: tensor name, with {i} for the
  layer and {e} for the expert (stacked on our axis after the layer's); layout: "linear" (torch Linear, [out, in]),
  "conv1d" (GPT-2's Conv1D, [in, out]), "copy" (same values, any shape) or "positions" (OPT's table, 2 rows ahead);
  n_in: how many of our leading (per-layer, per-expert) axes are inputs; part: (j, n) when our tensor is the j-th
  of n equal slices of the HF tensor's last axis (GPT-2's fused c_attn)."""

  ours: tuple
  hf: str
  layout: str = "linear"
  n_in: int = 1
  part: tuple[int, int] | None = None


def _block_rules(spec: ModelSpec, model_type: str) -> list[tuple[tuple, str, str, int, Any]]:
  if model_type == "gpt2":
    p = "transformer.h.{i}."
    rules = [(("attn_norm", "scale"), p + "ln_1.weight", "copy", 1, None),
             (("attn_norm", "bias"), p + "ln_1.bias", "copy", 1, None),
             (("mlp_norm", "scale"), p + "ln_2.weight", "copy", 1, None),
             (("mlp_norm", "bias"), p + "ln_2.bias", "copy", 1, None),
             (("attn", "wo"), p + "attn.c_proj.weight", "conv1d", 2, None),
             (("attn", "bo"), p + "attn.c_proj.bias", "copy", 1, None),
             (("mlp", "w_in"), p + "mlp.c_fc.weight", "conv1d", 1, None),
             (("mlp", "b_in"), p + "mlp.c_fc.bias", "copy", 1, None),
             (("mlp", "w_out"), p + "mlp.c_proj.weight", "conv1d", 1, None),
             (("mlp", "b_out"), p + "mlp.c_proj.bias", "copy", 1, None)]
    for j, name in enumerate("qkv"):
      rules += [(("attn", f"w{name}"), p + "attn.c_attn.weight", "conv1d", 1, (j, 3)),
                (("attn", f"b{name}"), p + "attn.c_attn.bias", "copy", 1, (j, 3))]
    return rules
  if model_type == "opt":
    p = "model.decoder.layers.{i}."
    rules = [(("attn_norm", "scale"), p + "self_attn_layer_norm.weight", "copy", 1, None),
             (("attn_norm", "bias"), p + "self_attn_layer_norm.bias", "copy", 1, None),
             (("mlp_norm", "scale"), p + "final_layer_norm.weight", "copy", 1, None),
             (("mlp_norm", "bias"), p + "final_layer_norm.bias", "copy", 1, None),
             (("attn", "wo"), p + "self_attn.out_proj.weight", "linear", 2, None),
             (("attn", "bo"), p + "self_attn.out_proj.bias", "copy", 1, None),
             (("mlp", "w_in"), p + "fc1.weight", "linear", 1, None), (("mlp", "b_in"), p + "fc1.bias", "copy", 1, None),
             (("mlp", "w_out"), p + "fc2.weight", "linear", 1, None),
             (("mlp", "b_out"), p + "fc2.bias", "copy", 1, None)]
    for name in "qkv":
      rules += [(("attn", f"w{name}"), p + f"self_attn.{name}_proj.weight", "linear", 1, None),
                (("attn", f"b{name}"), p + f"self_attn.{name}_proj.bias", "copy", 1, None)]
    return rules
  p = "model.layers.{i}."
  rules = [(("attn_norm", "scale"), p + "input_layernorm.weight", "copy", 1, None),
           (("mlp_norm", "scale"), p + "post_attention_layernorm.weight", "copy", 1, None),
           (("attn", "wo"), p + "self_attn.o_proj.weight", "linear", 2, None)]
  for name in "qkv":
    rules.append((("attn", f"w{name}"), p + f"self_attn.{name}_proj.weight", "linear", 1, None))
    if spec.use_bias:
      rules.append((("attn", f"b{name}"), p + f"self_attn.{name}_proj.bias", "copy", 1, None))
  if spec.use_bias:
    rules.append((("attn", "bo"), p + "self_attn.o_proj.bias", "copy", 1, None))
  if model_type == "mixtral":
    moe = p + "block_sparse_moe."
    return rules + [(("moe", "router"), moe + "gate.weight", "linear", 1, None),
                    (("moe", "w_gate"), moe + "experts.{e}.w1.weight", "linear", 1, None),
                    (("moe", "w_in"), moe + "experts.{e}.w3.weight", "linear", 1, None),
                    (("moe", "w_out"), moe + "experts.{e}.w2.weight", "linear", 1, None)]
  for ours, theirs in (("w_gate", "gate_proj"), ("w_in", "up_proj"), ("w_out", "down_proj")):
    rules.append((("mlp", ours), p + f"mlp.{theirs}.weight", "linear", 1, None))
    if spec.has_mlp_bias:
      rules.append((("mlp", "b" + ours[1:]), p + f"mlp.{theirs}.bias", "copy", 1, None))
  return rules


def rules(spec: ModelSpec, model_type: str) -> list[Rule]:
  """Every parameter of a `spec` model and its Hugging Face tensor, for `model_type`."""
  block = ("blocks", "layers", 0) if spec.num_experts else ("blocks",)
  out = [Rule(block + ours, hf, layout, n_in, part) for ours, hf, layout, n_in, part in _block_rules(spec, model_type)]
  prefix = {"gpt2": "transformer.", "opt": "model.decoder."}.get(model_type, "model.")
  out.append(Rule(("embed",), prefix + ("wte.weight" if model_type == "gpt2" else "embed_tokens.weight"), "copy"))
  if model_type == "gpt2":
    out += [Rule(("pos_embed",), prefix + "wpe.weight", "copy"), Rule(("final_norm", "scale"), prefix + "ln_f.weight", "copy"),
            Rule(("final_norm", "bias"), prefix + "ln_f.bias", "copy")]
  elif model_type == "opt":
    out.append(Rule(("pos_embed",), prefix + "embed_positions.weight", "positions"))
    if spec.norm_position == "pre":
      out += [Rule(("final_norm", "scale"), prefix + "final_layer_norm.weight", "copy"),
              Rule(("final_norm", "bias"), prefix + "final_layer_norm.bias", "copy")]
    if spec.embed_proj_dim not in (0, spec.embed_dim):
      out += [Rule(("project_in",), prefix + "project_in.weight"), Rule(("project_out",), prefix + "project_out.weight")]
  else:
    out.append(Rule(("final_norm", "scale"), prefix + "norm.weight", "copy"))
  if not spec.tie_embeddings:
    out.append(Rule(("head",), "lm_head.weight"))
  return out


def _to_ours(rule: Rule, t: np.ndarray, shape: tuple) -> np.ndarray:
  """One HF tensor (one layer, one expert) -> our layout `shape`."""
  if rule.part is not None:
    j, n = rule.part
    t = np.split(t, n, axis=-1)[j]
  if rule.layout == "linear":
    t = t.T
  elif rule.layout == "positions":
    t = t[_OPT_POSITION_OFFSET:]
  return t.reshape(shape)


def _to_hf(rule: Rule, a: np.ndarray) -> np.ndarray:
  """Inverse of `_to_ours` (without the part split, which `save_pretrained` concatenates)."""
  if rule.layout == "positions":
    return np.concatenate([np.zeros((_OPT_POSITION_OFFSET, a.shape[-1]), a.dtype), a])
  if rule.layout == "copy":
    return a.reshape(-1) if "{i}" in rule.hf else a  # per-layer copies (norms, biases) are vectors in HF files
  a = a.reshape(int(np.prod(a.shape[:rule.n_in])), -1)
  return a.T if rule.layout == "linear" else a


# -- reading ------------------------------------------------------------------------------------------------------

def _index_files(index: str, hf_dir: str) -> dict[str, str]:
  """{tensor name: shard path} of a sharded checkpoint's index; ValueError for an index that is not a JSON object
  with a "weight_map" of file names, or that names a file outside `hf_dir` (an absolute path, "..", a symlink out)."""
  try:
    with open(index, encoding="utf-8") as f:
      weight_map = json.load(f)["weight_map"]
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
      raise TypeError("weight_map must map tensor names to file names")
  except (ValueError, KeyError, TypeError) as e:
    raise ValueError(f"{index} is not a safetensors index ({type(e).__name__}: {e})") from e
  root = os.path.realpath(hf_dir)
  files = {}
  for name, shard in weight_map.items():
    path = os.path.realpath(os.path.join(hf_dir, shard))
    if os.path.isabs(shard) or os.path.commonpath([root, path]) != root:
      raise ValueError(f"{index}: tensor {name} points at {shard!r}, outside {hf_dir}; shards must be files in the "
                       "checkpoint's own directory")
    files[name] = path
  return files


class SafetensorsReader:
  """Tensors of a Hugging Face directory by name, one at a time (`model.safetensors` or a sharded index)."""

  def __init__(self, hf_dir: str):
    index = os.path.join(hf_dir, "model.safetensors.index.json")
    single = os.path.join(hf_dir, "model.safetensors")
    if os.path.exists(index):
      self.files = _index_files(index, hf_dir)
    elif os.path.exists(single):
      with safe_open(single, "np") as f:
        self.files = {k: single for k in f.keys()}
    else:
      raise FileNotFoundError(f"no model.safetensors or model.safetensors.index.json in {hf_dir}: convert "
                              f"PyTorch .bin checkpoints to safetensors first")
    self.used: set[str] = set()

  def resolve(self, name: str) -> str:
    """The stored name of `name`: hub files of GPT-2 and OPT often lack the 'transformer.' / 'model.' prefix."""
    for candidate in (name, name.removeprefix("transformer."), name.removeprefix("model.")):
      if candidate in self.files:
        return candidate
    raise KeyError(f"tensor {name} not found in the checkpoint (it has {len(self.files)} tensors, e.g. "
                   f"{sorted(self.files)[:3]})")

  def __contains__(self, name: str) -> bool:
    try:
      self.resolve(name)
      return True
    except KeyError:
      return False

  def get(self, name: str) -> np.ndarray:
    stored = self.resolve(name)
    self.used.add(stored)
    with safe_open(self.files[stored], "np") as f:
      if f.get_slice(stored).get_dtype() != "BF16":
        return f.get_tensor(stored)
    with jax.default_device(jax.devices("cpu")[0]), safe_open(self.files[stored], "flax") as f:
      return np.asarray(f.get_tensor(stored))  # numpy has no bfloat16: read through jax (ml_dtypes)

  def unused(self) -> list[str]:
    return sorted(n for n in self.files if n not in self.used and not n.endswith(_BUFFERS))


def _read_leaf(reader: SafetensorsReader, rule: Rule, shape: tuple, dtype) -> np.ndarray:
  """Our whole parameter (every layer and expert stacked) in our layout and `dtype`, on the host."""
  per_layer = "{i}" in rule.hf
  experts = "{e}" in rule.hf
  inner = shape[1 + experts:] if per_layer else shape[experts:]

  def one(i=None, e=None):
    return _to_ours(rule, reader.get(rule.hf.format(i=i, e=e)), inner).astype(dtype)

  def layer(i=None):
    return np.stack([one(i, e) for e in range(shape[1 if per_layer else 0])]) if experts else one(i)

  return np.stack([layer(i) for i in range(shape[0])]) if per_layer else layer()


def load_pretrained(hf_dir: str, *, dtype=jnp.float32, mesh: jax.sharding.Mesh | None = None) -> Transformer:
  """Our model with the weights of a Hugging Face directory; logits of `model(input_ids)` are [B, L, vocab] float32.

  Parameters are stored and computed in `dtype`. With `mesh`, each parameter is placed on its sharding from the
  model's logical axes (model/sharding.py) as soon as it is read. Raises UnsupportedModelError for architectures
  or options that cannot be represented, and ValueError naming any checkpoint tensor that was not used."""
  config = config_from_hf(read_config(hf_dir), jnp.dtype(dtype).name)
  return load_weights(hf_dir, ModelSpec.from_config(config.model), mesh)


def load_weights(hf_dir: str, spec: ModelSpec, mesh: jax.sharding.Mesh | None = None) -> Transformer:
  """`load_pretrained` for a given spec (see `config_from_hf`)."""
  model_type = read_config(hf_dir)["model_type"]
  abstract = nnx.eval_shape(lambda: Transformer(spec, rngs=nnx.Rngs(params=0)))
  graphdef, state = nnx.split(abstract)
  params = nnx.to_pure_dict(state)
  specs = sharding.param_specs(abstract) if mesh is not None else None
  reader = SafetensorsReader(hf_dir)
  table = {r.ours: r for r in rules(spec, model_type)}

  def place(path, leaf):
    key = tuple(p.key for p in path)
    if key not in table:
      raise ValueError(f"no Hugging Face tensor maps to our parameter {'/'.join(map(str, key))}")
    host = _read_leaf(reader, table[key], leaf.shape, leaf.dtype)
    if specs is None:
      return jnp.asarray(host)
    target = jax.sharding.NamedSharding(mesh, _lookup(specs, key))
    return jax.make_array_from_callback(host.shape, target, lambda index: host[index])

  params = jax.tree_util.tree_map_with_path(place, params)
  tied_head = spec.tie_embeddings and "lm_head.weight" in reader  # some files store the tied head as well
  left = [n for n in reader.unused() if not (tied_head and n == reader.resolve("lm_head.weight"))]
  if left:
    raise ValueError(f"{len(left)} checkpoint tensors were not used (unsupported options?): {left[:8]}")
  nnx.replace_by_pure_dict(state, params)
  return nnx.merge(graphdef, state)


def _lookup(tree: dict, key: tuple):
  for k in key:
    tree = tree[k]
  return tree


# -- writing ------------------------------------------------------------------------------------------------------

def hf_tensors(model: Transformer, model_type: str | None = None) -> dict[str, np.ndarray]:
  """Every tensor of the Hugging Face checkpoint of `model`, by name, in the parameters' dtype."""
  spec = model.spec
  model_type = architecture_of(spec, model_type)
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  pieces: dict[str, dict[int, np.ndarray]] = {}
  for rule in rules(spec, model_type):
    value = np.asarray(jax.device_get(_lookup(params, rule.ours)))
    per_layer, experts = "{i}" in rule.hf, "{e}" in rule.hf
    for i in range(value.shape[0]) if per_layer else [None]:
      layer = value[i] if per_layer else value
      for e in range(layer.shape[0]) if experts else [None]:
        pieces.setdefault(rule.hf.format(i=i, e=e), {})[rule.part[0] if rule.part else 0] = _to_hf(
            rule, layer[e] if experts else layer)
  return {name: np.concatenate([parts[j] for j in sorted(parts)], axis=-1) if len(parts) > 1 else parts[0]
          for name, parts in pieces.items()}


def check_new_directory(out_dir: str) -> None:
  """FileExistsError unless `out_dir` is new or empty (exports never overwrite)."""
  if os.path.exists(out_dir) and os.listdir(out_dir):
    raise FileExistsError(f"{out_dir} is not empty: choose a new directory for the export")


@contextlib.contextmanager
def staged_directory(out_dir: str):
  """Yields a temporary directory beside `out_dir` to write into; renamed to `out_dir` when the block ends, removed
  if it raises, so a crash never leaves a half-written export. out_dir must be new or empty."""
  check_new_directory(out_dir)
  parent = os.path.dirname(os.path.abspath(out_dir))
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=".export-", dir=parent)
  try:
    yield tmp
    if os.path.exists(out_dir):
      os.rmdir(out_dir)
    os.rename(tmp, out_dir)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise


def save_pretrained(model: Transformer, out_dir: str, *, model_type: str | None = None, extra_config: dict | None = None,
                    max_shard_bytes: int = 5 * 2**30, extra_files: dict[str, str | dict] | None = None) -> str:
  """Writes `model` as a Hugging Face directory (config.json and safetensors, sharded with an index past
  `max_shard_bytes`) that `transformers.AutoModelForCausalLM.from_pretrained` loads into the matching class.

  `model_type` is a preference, used where it fits the model (`architecture_of`); `extra_config` adds config keys (token ids, ...);
  `extra_files` {name: source path, or a dict written as JSON} go in as well (tokenizer files). The
  directory is written beside `out_dir` and renamed into place, so a crash leaves no half-written model; out_dir
  must not exist or be empty. Returns out_dir."""
  model_type = architecture_of(model.spec, model_type)
  check_new_directory(out_dir)
  tensors = hf_tensors(model, model_type)
  with staged_directory(out_dir) as tmp:
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for name in sorted(tensors):
      if size and size + tensors[name].nbytes > max_shard_bytes:
        shards.append({})
        size = 0
      shards[-1][name] = tensors[name]
      size += tensors[name].nbytes
    names = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors" for k in range(len(shards))])
    with jax.default_device(jax.devices("cpu")[0]):
      for file, shard in zip(names, shards):
        save_file({k: jnp.asarray(v) for k, v in shard.items()}, os.path.join(tmp, file), metadata={"format": "pt"})
    if len(shards) > 1:
      index = {"metadata": {"total_size": int(sum(t.nbytes for t in tensors.values()))},
               "weight_map": {k: f for f, shard in zip(names, shards) for k in shard}}
      with open(os.path.join(tmp, "model.safetensors.index.json"), "w", encoding="utf-8") as f:
        json.dump(index, f, indent=2)
    with open(os.path.join(tmp, "config.json"), "w", encoding="utf-8") as f:
      json.dump(hf_config(model.spec, model_type, extra_config), f, indent=2)
    for name, source in (extra_files or {}).items():
      if isinstance(source, dict):
        with open(os.path.join(tmp, name), "w", encoding="utf-8") as f:
          json.dump(source, f, indent=2)
      else:
        shutil.copy(source, os.path.join(tmp, name))
  return out_dir
