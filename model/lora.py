"""LoRA (Hu et al., 2021) adapters on the linear layers of the blocks, and the parameter-tree surgery around them.

A targeted weight W [*in, *out] gains two parameters beside it in its module, `<w>_lora_a` A [*in, r] and
`<w>_lora_b` B [r, *out], and the layer computes x W + (alpha / r) * dropout(x) A B. A starts uniform in
+-1/sqrt(fan_in) (PEFT's Kaiming-uniform default) and B at zero, so a fresh adapter leaves the model unchanged.
Training updates A and B only: the train state keeps them as its `params` and the frozen base apart (`split`),
so the base has neither gradients nor optimizer state. QLoRA keeps that frozen base quantized (`BASE_FORMATS`).

Target names (`train.lora.targets`) and the weights they adapt: q, k, v, o -> attn.wq/wk/wv/wo; mlp_in, mlp_gate,
mlp_out -> mlp.w_in/w_gate/w_out (dense blocks; MoE experts are not adapted).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import zlib
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from configs import base

TARGETS = {"q": ("attn", "wq"), "k": ("attn", "wk"), "v": ("attn", "wv"), "o": ("attn", "wo"),
           "mlp_in": ("mlp", "w_in"), "mlp_gate": ("mlp", "w_gate"), "mlp_out": ("mlp", "w_out")}
base.check_implemented("train.lora.targets", base.LORA_TARGETS, TARGETS)

# train.lora.base_quant -> the model fields of the frozen base (a model.quant format the matmuls dequantize inside)
# (int4: the blocks' weights as 4-bit codes, the embedding and head as int8 rows, as `--head_quant=int8` serves them)
BASE_FORMATS = {"none": {}, "int8": {"quant": "int8_weight"},
                "int4": {"quant": "packed", "quant_bits": 4, "quant_group_size": 64, "head_quant": "int8"}}
base.check_implemented("train.lora.base_quant", base.LORA_BASE_QUANTS, BASE_FORMATS)

SUFFIXES = ("_lora_a", "_lora_b")


def base_spec(spec):
  """The float model without adapters under a LoRA `spec` (what fine-tuning starts from and merging gives)."""
  return dataclasses.replace(spec, lora_rank=0, lora_targets=(), lora_dropout=0.0, quant="none", quant_bits=8,
                             quant_group_size=0, head_quant="none")


def target_weights(spec) -> frozenset[str]:
  """Names of the weights (wq, ..., w_out) that carry adapters in models of `spec`."""
  return frozenset(TARGETS[t][1] for t in spec.lora_targets) if spec.lora_rank else frozenset()


def adapter_pair(spec, rngs: nnx.Rngs, name: str, shape: tuple, names: tuple, n_in: int):
  """(A Param [*in, r], B Param [r, *out]) for weight `name` of `shape` when `spec` adapts it, else (None, None)."""
  if name not in target_weights(spec):
    return None, None
  r, fan_in = spec.lora_rank, math.prod(shape[:n_in])
  bound = 1.0 / math.sqrt(fan_in)
  bank = (spec.lora_bank,) if spec.lora_bank else ()
  a = jax.random.uniform(rngs.params(), (*bank, *shape[:n_in], r), jnp.float32, -bound, bound)
  bank_axis = (None,) if bank else ()
  return (nnx.Param(a.astype(spec.weight_dtype), logical_axes=(*bank_axis, *names[:n_in], None)),
          nnx.Param(jnp.zeros((*bank, r, *shape[n_in:]), spec.weight_dtype),
                    logical_axes=(*bank_axis, None, *names[n_in:])))


def scaling(spec) -> float:
  return spec.lora_alpha / spec.lora_rank


# -- dropout: the train step opens a key scope; each layer and adapter folds in its own index and name -------------

_KEYS: list[jax.Array] = []


@contextlib.contextmanager
def dropout_key(key: jax.Array | None):
  """Adapters called inside use dropout keyed by `key` (None: no dropout), folded per layer and adapter."""
  _KEYS.append(key)
  try:
    yield
  finally:
    _KEYS.pop()


@contextlib.contextmanager
def layer_scope(index):
  """Inside a dropout scope, gives layer `index` (int or traced int) its own key."""
  if not _KEYS or _KEYS[-1] is None:
    yield
    return
  with dropout_key(jax.random.fold_in(_KEYS[-1], index)):
    yield


_ROWS: list[jax.Array] = []


@contextlib.contextmanager
def row_adapters(ids: jax.Array):
  """Inside, models with an adapter bank (`spec.lora_bank`) use adapter ids[b] for batch row b (0: none)."""
  _ROWS.append(ids)
  try:
    yield
  finally:
    _ROWS.pop()


def _bank_delta(spec, x, a, b, n_in: int) -> jax.Array:
  """Each batch row through its own adapter of the bank: x [B, L, *in], a [bank, *in, r], b [bank, r, *out]."""
  if not _ROWS:
    raise ValueError("a model with an adapter bank runs inside lora.row_adapters(ids) (the serving engine's step)")
  ids = _ROWS[-1]
  k, r = math.prod(x.shape[x.ndim - n_in:]), a.shape[-1]
  a_rows = jnp.take(a, ids, axis=0).reshape(ids.shape[0], k, r).astype(x.dtype)
  b_rows = jnp.take(b, ids, axis=0).reshape(ids.shape[0], r, -1).astype(x.dtype)
  h = jnp.einsum("blk,bkr->blr", x.reshape(x.shape[0], -1, k), a_rows, preferred_element_type=jnp.float32)
  y = jnp.einsum("blr,brn->bln", h.astype(x.dtype), b_rows, preferred_element_type=jnp.float32)
  return y.reshape(*x.shape[:x.ndim - n_in], *b.shape[2:]) * scaling(spec)


def delta(spec, x: jax.Array, a: jax.Array, b: jax.Array, n_in: int, name: str) -> jax.Array:
  """(alpha / r) * dropout(x) A B: x [..., *in], a [*in, r], b [r, *out] -> [..., *out] float32 (with a bank,
  a [bank, *in, r] and b [bank, r, *out], each batch row through its own adapter)."""
  if spec.lora_bank:
    return _bank_delta(spec, x, a, b, n_in)
  if spec.lora_dropout and _KEYS and _KEYS[-1] is not None:
    keep = 1.0 - spec.lora_dropout
    mask = jax.random.bernoulli(jax.random.fold_in(_KEYS[-1], zlib.crc32(name.encode())), keep, x.shape)
    x = jnp.where(mask, x / keep, 0).astype(x.dtype)
  dims = (tuple(range(x.ndim - n_in, x.ndim)), tuple(range(n_in)))
  h = jax.lax.dot_general(x, a.astype(x.dtype), (dims, ((), ())), preferred_element_type=jnp.float32)
  y = jnp.tensordot(h.astype(x.dtype), b.astype(x.dtype), axes=1, preferred_element_type=jnp.float32)
  return y * scaling(spec)


# -- parameter trees -------------------------------------------------------------------------------------------------

def is_adapter(name: str) -> bool:
  return name.endswith(SUFFIXES)


def split(params: dict) -> tuple[dict, dict]:
  """A pure parameter dict -> (adapters, base): two dicts of the same nesting; subtrees left empty are dropped."""
  adapters, frozen = {}, {}
  for key, value in params.items():
    if isinstance(value, dict):
      a, f = split(value)
      if a:
        adapters[key] = a
      if f:
        frozen[key] = f
    elif is_adapter(str(key)):
      adapters[key] = value
    else:
      frozen[key] = value
  return adapters, frozen


def combine(adapters: dict, frozen: dict) -> dict:
  """Inverse of `split`: one nested dict holding both."""
  out = dict(frozen)
  for key, value in adapters.items():
    out[key] = combine(value, out.get(key, {})) if isinstance(value, dict) else value
  return out


def merge(spec, params: dict) -> dict:
  """Float `params` of a LoRA `spec` -> the base parameters with W + (alpha / r) A B folded in, adapters removed
  (the model of `spec` without LoRA computes the same function)."""
  adapters, merged = split(params)
  merged = jax.tree.map(lambda x: x, merged)  # copies of the nested dicts
  _fold(adapters, merged, scaling(spec), "")
  return merged


def _fold(adapters: dict, frozen: dict, scale: float, where: str) -> None:
  for key, value in adapters.items():
    if isinstance(value, dict):
      _fold(value, frozen[key], scale, f"{where}{key}.")
    elif str(key).endswith("_lora_a"):
      name = str(key)[:-len("_lora_a")]
      a, b, w = value, adapters[name + "_lora_b"], frozen[name]
      if not jnp.issubdtype(w.dtype, jnp.floating):
        raise ValueError(f"merging needs a float base; {where}{name} is {w.dtype} (a quantized QLoRA base): serve "
                         "the adapter unmerged, or merge into the float model it came from")
      lead = a.ndim + b.ndim - 2 - w.ndim  # stacked layers (and block-group) axes
      a2 = a.reshape(*a.shape[:lead], -1, a.shape[-1]).astype(jnp.float32)
      b2 = b.reshape(*b.shape[:lead + 1], -1).astype(jnp.float32)
      frozen[name] = (w.astype(jnp.float32) + scale * jnp.matmul(a2, b2).reshape(w.shape)).astype(w.dtype)


def bank(named: list[tuple[Any, dict]]) -> tuple[dict, dict]:
  """Several adapters of one base -> (LoRA spec fields, adapter tree) of a bank that holds them at indices 1..n and
  none at 0. named: [(lora spec, adapter tree)] as `peft.load_adapter` or a LoRA run gives them. Ranks are padded
  with zeros to the largest and each adapter's alpha / r is folded into its B, so every row computes exactly its own
  adapter's update; a target some adapter lacks is zero for it."""
  rank = max(spec.lora_rank for spec, _ in named)
  targets = tuple(t for t in TARGETS if any(t in spec.lora_targets for spec, _ in named))
  out: dict = {}
  for target in targets:
    parent, name = TARGETS[target]
    shapes = next(tree["blocks"][parent] for spec, tree in named if target in spec.lora_targets)
    a_shape, b_shape = shapes[name + "_lora_a"].shape, shapes[name + "_lora_b"].shape  # [L, *in, r], [L, r, *out]
    a_bank = [jnp.zeros((*a_shape[:-1], rank), jnp.float32)]
    b_bank = [jnp.zeros((b_shape[0], rank, *b_shape[2:]), jnp.float32)]
    for spec, tree in named:
      if target in spec.lora_targets:
        a, b = tree["blocks"][parent][name + "_lora_a"], tree["blocks"][parent][name + "_lora_b"]
        pad = rank - spec.lora_rank
        a_bank.append(jnp.pad(a.astype(jnp.float32), [(0, 0)] * (a.ndim - 1) + [(0, pad)]))
        b_bank.append(jnp.pad(b.astype(jnp.float32) * scaling(spec), [(0, 0), (0, pad)] + [(0, 0)] * (b.ndim - 2)))
      else:
        a_bank.append(a_bank[0])
        b_bank.append(b_bank[0])
    dtype = shapes[name + "_lora_a"].dtype
    group = out.setdefault("blocks", {}).setdefault(parent, {})
    group[name + "_lora_a"] = jnp.stack(a_bank, axis=1).astype(dtype)  # [L, bank, *in, r]
    group[name + "_lora_b"] = jnp.stack(b_bank, axis=1).astype(dtype)
  fields = dict(lora_rank=rank, lora_alpha=float(rank), lora_targets=targets, lora_dropout=0.0,
                lora_bank=len(named) + 1)
  return fields, out


def count(tree: Any) -> int:
  return int(sum(math.prod(x.shape) for x in jax.tree.leaves(tree)))
