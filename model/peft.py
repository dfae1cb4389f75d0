"""LoRA adapters in the Hugging Face PEFT format: `adapter_config.json` + `adapter_model.safetensors`.

`save_adapter` writes our adapters so that `peft.PeftModel.from_pretrained(base, DIR)` on the exported base model
computes what ours does; `load_adapter` reads a PEFT LoRA directory (ours or PEFT's) into our adapter tree.
Tensors: `base_model.model.<module>.lora_A.weight` [r, in] and `.lora_B.weight` [out, r] per layer, where <module>
is the Hugging Face linear layer (`model.hf.rules`); the update is (alpha / r) B A, like ours (A [*in, r], B [r, *out]).
GPT-2's fused c_attn holds q, k and v: our three adapters export as one of rank 3r (A stacked, B block-diagonal,
`rank_pattern` / `alpha_pattern` keep the scale), and a c_attn adapter imports as three sharing its A.
Per-module ranks and alphas (rank_pattern, alpha_pattern, use_rslora) import exactly: every adapter is padded with
zeros to the largest rank and its own scale folded into B.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
from safetensors import safe_open
from safetensors.flax import save_file

from model import hf
from model import lora
from model.transformer import ModelSpec

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."


def _target_rules(spec: ModelSpec, model_type: str) -> dict[str, hf.Rule]:
  """Our LoRA target name -> the Hugging Face rule of the weight it adapts (dense models)."""
  if spec.num_experts:
    raise hf.UnsupportedModelError("PEFT adapters are read and written for dense models only")
  by_ours = {r.ours: r for r in hf.rules(spec, model_type)}
  return {t: by_ours[("blocks", *w)] for t, w in lora.TARGETS.items() if ("blocks", *w) in by_ours}


def _module(rule: hf.Rule) -> str:
  return rule.hf.removesuffix(".weight")  # with {i}


def _short(rule: hf.Rule) -> str:
  """The module name PEFT's target_modules matches (e.g. self_attn.q_proj, attn.c_attn, mlp.c_proj)."""
  return ".".join(_module(rule).split(".")[-2:])


def save_adapter(spec: ModelSpec, adapters: dict, out_dir: str, *, base_model: str = "",
                 model_type: str | None = None) -> str:
  """Writes the adapters (`lora.split(params)[0]` of a LoRA `spec`) as a PEFT LoRA directory for the Hugging Face
  export of the base model (`hf.save_pretrained`, same `model_type`). out_dir must not exist or be empty."""
  model_type = hf.architecture_of(spec, model_type)
  hf.check_new_directory(out_dir)
  rules = _target_rules(spec, model_type)
  blocks = jax.device_get(adapters["blocks"])
  r, layers = spec.lora_rank, spec.num_layers
  modules: dict[str, dict] = {}  # module (with {i}) -> {"rule", "parts": {j: (A [L, in, r], B [L, r, out])}}
  for target in spec.lora_targets:
    if target not in rules:
      continue
    rule = rules[target]
    parent, name = lora.TARGETS[target]
    a = np.asarray(blocks[parent][name + "_lora_a"], np.float32)
    b = np.asarray(blocks[parent][name + "_lora_b"], np.float32)
    entry = modules.setdefault(_module(rule), {"rule": rule, "parts": {}})
    entry["parts"][rule.part[0] if rule.part else 0] = (a.reshape(layers, -1, r), b.reshape(layers, r, -1))
  tensors, rank_pattern, alpha_pattern = {}, {}, {}
  for module, entry in modules.items():
    rule, parts = entry["rule"], entry["parts"]
    n = rule.part[1] if rule.part else 1
    if n == 1:
      a, b = parts[0]
    else:  # fused: rank n * r, A stacked, B block-diagonal (missing parts stay zero)
      some_a, some_b = next(iter(parts.values()))
      k, out = some_a.shape[1], some_b.shape[2]
      a = np.zeros((layers, k, n * r), np.float32)
      b = np.zeros((layers, n * r, n * out), np.float32)
      for j, (aj, bj) in parts.items():
        a[:, :, j * r:(j + 1) * r] = aj
        b[:, j * r:(j + 1) * r, j * out:(j + 1) * out] = bj
      rank_pattern[_short(rule)] = n * r
      alpha_pattern[_short(rule)] = n * spec.lora_alpha
    for i in range(layers):
      name = PREFIX + module.format(i=i)
      tensors[name + ".lora_A.weight"] = np.ascontiguousarray(a[i].T)
      tensors[name + ".lora_B.weight"] = np.ascontiguousarray(b[i].T)
  config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": spec.lora_alpha,
            "lora_dropout": spec.lora_dropout, "target_modules": sorted(_short(m["rule"]) for m in modules.values()),
            "bias": "none", "fan_in_fan_out": model_type == "gpt2", "base_model_name_or_path": base_model or None,
            "rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern, "use_rslora": False, "use_dora": False,
            "inference_mode": True, "modules_to_save": None, "init_lora_weights": True}
  with hf.staged_directory(out_dir) as tmp:
    dtype = jnp.dtype(spec.param_dtype)
    with jax.default_device(jax.devices("cpu")[0]):
      save_file({k: jnp.asarray(v, dtype) for k, v in tensors.items()}, os.path.join(tmp, WEIGHTS),
                metadata={"format": "pt"})
    with open(os.path.join(tmp, CONFIG), "w", encoding="utf-8") as f:
      json.dump(config, f, indent=2)
  return out_dir


def _pattern_value(pattern: dict, module: str, default):
  for key, value in (pattern or {}).items():
    if module == key or module.endswith("." + key):
      return value
  return default


def load_adapter(adapter_dir: str, spec: ModelSpec, model_type: str | None = None) -> tuple[ModelSpec, dict]:
  """(LoRA spec over the float `spec`, adapter params) from a PEFT LoRA directory; the adapters compute exactly
  the PEFT model's update. ValueError naming the file and what is not supported (DoRA, bias training, modules the
  model has no adapter slot for)."""
  path = os.path.join(adapter_dir, CONFIG)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path} not found: --adapter must be a PEFT LoRA directory (adapter_config.json + "
                            f"{WEIGHTS}) or a LoRA training workdir")
  with open(path, encoding="utf-8") as f:
    config = json.load(f)
  if config.get("peft_type", "LORA") != "LORA" or config.get("use_dora") or config.get("bias", "none") != "none":
    raise ValueError(f"{path}: only plain LoRA adapters load (peft_type LORA, no DoRA, bias 'none'); got "
                     f"peft_type={config.get('peft_type')!r}, use_dora={config.get('use_dora')}, "
                     f"bias={config.get('bias')!r}")
  model_type = hf.architecture_of(spec, model_type)
  rules = _target_rules(spec, model_type)
  weights = os.path.join(adapter_dir, WEIGHTS)
  with safe_open(weights, "np") as f:
    names = set(f.keys())
  found: set[str] = set()  # modules (with {i}) read
  per_target = {}  # target -> (A [L, in, r], B [L, r, out] with the module's scale folded in)
  for target, rule in rules.items():
    module = _module(rule)
    if (PREFIX + module.format(i=0) + ".lora_A.weight") not in names:
      continue
    short = _short(rule)
    r = _pattern_value(config.get("rank_pattern"), short, config["r"])
    alpha = _pattern_value(config.get("alpha_pattern"), short, config.get("lora_alpha", r))
    scale = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
    a_layers, b_layers = [], []
    for i in range(spec.num_layers):
      a, b = (_read(weights, PREFIX + module.format(i=i) + f".lora_{x}.weight") for x in "AB")
      if rule.part:
        j, n = rule.part
        b = np.split(b, n, axis=0)[j]
      a_layers.append(a.T)
      b_layers.append(b.T * scale)
    found.add(module)
    per_target[target] = (np.stack(a_layers), np.stack(b_layers))
  used = {PREFIX + m.format(i=i) + f".lora_{x}.weight" for m in found for i in range(spec.num_layers) for x in "AB"}
  if names - used:
    raise ValueError(f"{weights}: tensors for modules peakllm has no adapter slot for: {sorted(names - used)[:4]}")
  if not per_target:
    raise ValueError(f"{weights}: no LoRA tensor of this {model_type} model's linear layers")
  rank = max(a.shape[-1] for a, _ in per_target.values())
  adapters: dict = {}
  for target, (a, b) in per_target.items():
    parent, name = lora.TARGETS[target]
    w_in, w_out = hf_shapes(spec, name)
    pad = rank - a.shape[-1]
    a = np.pad(a, ((0, 0), (0, 0), (0, pad))).reshape(spec.num_layers, *w_in, rank)
    b = np.pad(b, ((0, 0), (0, pad), (0, 0))).reshape(spec.num_layers, rank, *w_out)
    dtype = jnp.dtype(spec.param_dtype)
    adapters.setdefault("blocks", {}).setdefault(parent, {}).update(
        {name + "_lora_a": jnp.asarray(a, dtype), name + "_lora_b": jnp.asarray(b, dtype)})
  lora_spec = dataclasses.replace(spec, lora_rank=rank, lora_alpha=float(rank),  # scales are folded into B
                                  lora_dropout=0.0, lora_targets=tuple(t for t in lora.TARGETS if t in per_target))
  return lora_spec, adapters


def _read(path: str, name: str) -> np.ndarray:
  with jax.default_device(jax.devices("cpu")[0]), safe_open(path, "flax") as f:
    return np.asarray(f.get_tensor(name), np.float32)


def hf_shapes(spec: ModelSpec, name: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
  """(input axes, output axes) of our weight `name` per layer."""
  d, h, k, hd, f = spec.embed_dim, spec.num_heads, spec.num_kv_heads, spec.head_dim, spec.mlp_dim
  return {"wq": ((d,), (h, hd)), "wk": ((d,), (k, hd)), "wv": ((d,), (k, hd)), "wo": ((h, hd), (d,)),
          "w_in": ((d,), (f,)), "w_gate": ((d,), (f,)), "w_out": ((f,), (d,))}[name]
