"""Flax NNX decoder-only transformer: GPT-2/OPT family and Llama family, selected by `ModelSpec.family`.

Blocks are stored stacked (every block parameter has a leading "layers" axis) and run either with `lax.scan` (one
compiled block) or unrolled; the parameter tree is the same both ways, so checkpoints move freely between the two.
Parameters are kept in `param_dtype`, matmuls run in `dtype` with float32 accumulation, and norms, softmax and logits
are float32.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Sequence

import jax
import numpy as np
from jax.ad_checkpoint import checkpoint_name
import jax.numpy as jnp
from flax import nnx

from configs import base
from model import attention as attention_lib
from model import lora as lora_lib
from model import mixed_matmul
from model import moe as moe_lib
from model import offload as offload_lib
from model import pipeline
from model import quant
from model.activations import ACTIVATIONS
from model.sharding import constrain

Cache = dict[str, jax.Array]  # k, v: [layers, B, S, K, D]; segment_ids: [B, S] int32; index: [] int32 (next slot)

REMAT_POLICIES = {  # model.remat -> what jax.checkpoint saves ("none": no checkpointing; "full": nothing saved)
    "none": None,
    "full": None,
    "save_dots": jax.checkpoint_policies.checkpoint_dots,
    "save_dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "save_attention_out": jax.checkpoint_policies.save_only_these_names("attention_out"),
}
base.check_implemented("model.remat", base.REMAT_POLICIES, REMAT_POLICIES)


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  """Resolved, hashable model hyper-parameters (all derived defaults filled in)."""

  family: str
  vocab_size: int
  num_layers: int
  embed_dim: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  mlp_dim: int
  max_len: int
  activation: str = "gelu"
  norm_eps: float = 1e-5
  rope_theta: float = 10000.0
  tie_embeddings: bool = True
  use_bias: bool = True
  param_dtype: str = "float32"
  dtype: str = "float32"
  matmul_dtype: str = ""  # operand dtype of the linear layers' matmuls, both passes ("": dtype); see mixed_matmul.py
  remat: str = "none"
  pipeline_microbatches: int = 0  # GPipe micro-batches when the mesh has a pipeline axis (0: 2 x stages)
  scan_layers: bool = True
  attention_impl: str = "xla"
  init_std: float = 0.02
  quant: str = "none"  # "none" | "int8_weight" (W8A16) | "w8a8" (SmoothQuant) | "packed" (infer.compress codes)
  matmul_impl: str = "auto"  # "auto" | "xla" | "pallas" | "native": how quantized matmuls run (model/quant.py)
  quant_bits: int = 8  # quant=packed: bits per code
  quant_group_size: int = 0  # quant=packed: inputs per scale/zero group (0: all inputs)
  head_quant: str = "none"  # quant=packed: "int8" holds the embedding and head as int8 rows + scales (W8A16)
  num_experts: int = 0  # 0: dense MLPs; > 0: every moe_every-th block has a mixture-of-experts MLP (model/moe.py)
  experts_per_token: int = 1
  expert_mlp_dim: int = 0
  moe_every: int = 1
  capacity_factor: float = 0.0  # 0: dropless
  moe_renormalize: bool = True
  mlp_bias: bool | None = None  # None: same as use_bias
  norm_position: str = "pre"  # "pre": x + f(norm(x)) and a final norm; "post": norm(x + f(x)), no final norm (OPT-350m)
  embed_proj_dim: int = 0  # token embedding width when it differs from embed_dim (projected in and out); 0 = embed_dim
  rope_scaling: str = "none"  # "none" | "llama3"
  rope_scaling_factor: float = 8.0
  rope_low_freq_factor: float = 1.0
  rope_high_freq_factor: float = 4.0
  rope_original_max_len: int = 8192
  loss_chunk_tokens: int = 0  # training: the head and cross-entropy run over chunks of this many tokens (0: at once)
  lora_rank: int = 0  # > 0: LoRA adapters of this rank on `lora_targets` (model/lora.py)
  lora_alpha: float = 16.0
  lora_dropout: float = 0.0
  lora_targets: tuple[str, ...] = ()
  lora_bank: int = 0  # serving: > 0 holds this many adapters per weight (index 0: none), picked per batch row
  offload: str = "none"  # inference: "weights", "kv" or "weights,kv" stream from host memory (model/offload.py)
  offload_ahead: bool = True  # offloaded weights: copy layer i + 1 in while layer i computes (False: one in flight)

  @classmethod
  def from_config(cls, m, lora=None) -> "ModelSpec":
    """Builds a spec from the `config.model` ConfigDict (defaults resolved as documented in configs/base.py), and
    with `lora` (`config.train.lora`, rank > 0) the LoRA model: adapters on the targets and the frozen base in the
    format of lora.base_quant."""
    if lora is not None and lora.rank:
      m = m.copy_and_resolve_references()
      m.update(lora_lib.BASE_FORMATS[lora.base_quant])
      return dataclasses.replace(cls.from_config(m), lora_rank=lora.rank, lora_alpha=float(lora.alpha),
                                 lora_dropout=float(lora.dropout), lora_targets=base.lora_targets(lora))
    return cls(family=m.family, vocab_size=m.vocab_size, num_layers=m.num_layers, embed_dim=m.embed_dim,
               num_heads=m.num_heads, num_kv_heads=base.num_kv_heads(m), head_dim=base.head_dim(m),
               mlp_dim=base.mlp_dim(m), max_len=m.max_len, activation=m.activation, norm_eps=m.norm_eps,
               rope_theta=m.rope_theta, tie_embeddings=m.tie_embeddings, use_bias=base.use_bias(m),
               param_dtype=m.param_dtype, dtype=m.dtype, matmul_dtype=m.matmul_dtype, remat=m.remat,
               pipeline_microbatches=m.pipeline_microbatches, scan_layers=m.scan_layers,
               attention_impl=m.attention_impl, init_std=m.init_std, quant=m.quant, matmul_impl=m.matmul_impl,
               quant_bits=m.quant_bits, quant_group_size=m.quant_group_size, head_quant=m.head_quant,
               num_experts=m.num_experts, experts_per_token=m.experts_per_token,
               expert_mlp_dim=m.expert_mlp_dim or base.mlp_dim(m), moe_every=m.moe_every,
               capacity_factor=m.capacity_factor, moe_renormalize=m.moe_renormalize, mlp_bias=base.mlp_bias(m),
               norm_position=m.norm_position, embed_proj_dim=m.embed_proj_dim, rope_scaling=m.rope_scaling,
               rope_scaling_factor=m.rope_scaling_factor, rope_low_freq_factor=m.rope_low_freq_factor,
               rope_high_freq_factor=m.rope_high_freq_factor, rope_original_max_len=m.rope_original_max_len,
               loss_chunk_tokens=m.loss_chunk_tokens)

  @property
  def layers_per_unit(self) -> int:
    """Blocks per scanned unit: 1 for dense models, moe_every for MoE models (see `BlockGroup`)."""
    return self.moe_every if self.num_experts else 1

  @property
  def has_mlp_bias(self) -> bool:
    return self.use_bias if self.mlp_bias is None else self.mlp_bias

  def rope_frequencies(self) -> np.ndarray:
    """RoPE inverse frequencies [head_dim // 2] float32, theta^(-2i/d), with Llama 3's rescaling when configured:
    wavelengths longer than original_max_len / low_freq_factor are divided by the factor, shorter than
    original_max_len / high_freq_factor kept, and the band between interpolated smoothly."""
    d = self.head_dim
    inv_freq = (1.0 / self.rope_theta ** (np.arange(0, d, 2, dtype=np.float32) / np.float32(d))).astype(np.float32)
    if self.rope_scaling == "none":
      return inv_freq
    factor, low, high = self.rope_scaling_factor, self.rope_low_freq_factor, self.rope_high_freq_factor
    wavelen = 2 * np.pi / inv_freq
    scaled = np.where(wavelen > self.rope_original_max_len / low, inv_freq / factor, inv_freq)
    smooth = (self.rope_original_max_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= self.rope_original_max_len / high) & (wavelen <= self.rope_original_max_len / low)
    return np.where(medium, smoothed, scaled).astype(np.float32)

  @property
  def compute_dtype(self):
    return jnp.dtype(self.dtype)

  @property
  def mixed_matmuls(self) -> bool:
    """Whether the linear layers run their matmuls in `matmul_dtype` apart from the compute dtype."""
    return bool(self.matmul_dtype) and jnp.dtype(self.matmul_dtype) != self.compute_dtype

  @property
  def weight_dtype(self):
    return jnp.dtype(self.param_dtype)


def _param(rngs: nnx.Rngs, shape, names, dtype, std: float | None) -> nnx.Param:
  """A parameter of `shape` with logical axis `names` (metadata `logical_axes`): normal(std) init, or ones/zeros when std is 1.0/0.0."""
  if std == 1.0:
    value = jnp.ones(shape, dtype)
  elif std == 0.0:
    value = jnp.zeros(shape, dtype)
  else:
    value = (std * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype)
  return nnx.Param(value, logical_axes=tuple(names))


def _weight(spec: ModelSpec, rngs: nnx.Rngs, shape, names, std: float, n_in: int = 1, scale_axes=None,
            block: bool = True):
  """A matmul weight whose first `n_in` axes are inputs: (float Param, None), or for quantized specs the stored form
  to be filled by `model.quant` or the compressed-workdir loader:
    * int8 formats: (int8 Param, float32 scale Param over `scale_axes`, default the output axes shape[n_in:]);
    * `packed` block weights: (uint8 code stream Param [k * n * bits / 8], float32 Param [2, groups, *out] holding
      scale and zero point); its embedding and head stay float, or int8 as above with `head_quant="int8"`."""
  if spec.quant == "none" or (spec.quant == "packed" and not block and spec.head_quant == "none"):
    return _param(rngs, shape, names, spec.weight_dtype, std), None
  if spec.quant == "packed" and block:
    k, out = math.prod(shape[:n_in]), tuple(shape[n_in:])
    groups = k // spec.quant_group_size if spec.quant_group_size else 1
    return (nnx.Param(jnp.zeros((k * math.prod(out) * spec.quant_bits // 8,), jnp.uint8), logical_axes=(None,)),
            nnx.Param(jnp.ones((2, groups) + out, jnp.float32), logical_axes=(None, None) + tuple(names[n_in:])))
  scale_axes = tuple(range(n_in, len(shape))) if scale_axes is None else scale_axes
  return (nnx.Param(jnp.zeros(shape, jnp.int8), logical_axes=tuple(names)),
          nnx.Param(jnp.ones(tuple(shape[a] for a in scale_axes), jnp.float32),
                    logical_axes=tuple(names[a] for a in scale_axes)))


def _matmul(spec: ModelSpec, x: jax.Array, w, scale: nnx.Param | None = None, n_in: int = 1,
            transposed: bool = False) -> jax.Array:
  """Contracts x's last `n_in` axes with w's first `n_in` axes in the compute dtype with float32 accumulation.

  x [..., *in], w [*in, *out] -> [..., *out] in the compute dtype. Quantized weights (int8 or packed codes with their
  `scale`) run through `model.quant.quantized_matmul`; `transposed` (quantized only): w is [out, in]."""
  dt = spec.compute_dtype
  if scale is not None:
    return quant.quantized_matmul(spec, x.astype(dt), w[...], scale[...], n_in, transposed).astype(dt)
  if spec.mixed_matmuls:
    w = w[...]
    k = math.prod(w.shape[:n_in])
    out = mixed_matmul.matmul(x.astype(dt).reshape(-1, k), w.reshape(k, -1), spec.matmul_dtype)
    return out.reshape(*x.shape[:x.ndim - n_in], *w.shape[n_in:]).astype(dt)
  dims = (tuple(range(x.ndim - n_in, x.ndim)), tuple(range(n_in)))
  out = jax.lax.dot_general(x.astype(dt), w[...].astype(dt), (dims, ((), ())), preferred_element_type=jnp.float32)
  return out.astype(dt)


def _linear(module, name: str, x: jax.Array, n_in: int = 1) -> jax.Array:
  """x through the module's weight `name` (with its `<name>_scale` when quantized, and its LoRA adapter
  `<name>_lora_a/_b` when it has one): [..., *in] -> [..., *out] in the compute dtype."""
  spec = module.spec
  y = _matmul(spec, x, getattr(module, name), getattr(module, name + "_scale"), n_in)
  a = getattr(module, name + "_lora_a", None)
  if a is None:
    return y
  return (y + lora_lib.delta(spec, x.astype(y.dtype), a[...], getattr(module, name + "_lora_b")[...], n_in,
                             name)).astype(y.dtype)


class Norm(nnx.Module):
  """LayerNorm (gpt) or RMSNorm (llama) over the last axis, computed in float32. x [..., D] -> [..., D] compute dtype."""

  def __init__(self, spec: ModelSpec, rngs: nnx.Rngs):
    self.spec = spec
    self.scale = _param(rngs, (spec.embed_dim,), ("embed",), spec.weight_dtype, 1.0)
    self.bias = _param(rngs, (spec.embed_dim,), ("embed",), spec.weight_dtype, 0.0) if spec.family == "gpt" else None

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    if self.bias is not None:
      x32 = x32 - x32.mean(-1, keepdims=True)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, -1, keepdims=True) + self.spec.norm_eps)
    y = y * self.scale[...].astype(jnp.float32)
    if self.bias is not None:
      y = y + self.bias[...].astype(jnp.float32)
    return y.astype(self.spec.compute_dtype)


def rope(x: jax.Array, positions: jax.Array, inv_freq) -> jax.Array:
  """Rotary embedding (half-split convention, as in HF Llama). x [B, L, N, D], positions [B, L], inv_freq [D/2]
  float32 (`ModelSpec.rope_frequencies`) -> same shape/dtype as x."""
  freqs = jnp.asarray(inv_freq, jnp.float32)
  angles = positions.astype(jnp.float32)[:, :, None, None] * freqs  # [B, L, 1, D/2]
  sin, cos = jnp.sin(angles), jnp.cos(angles)
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


class Attention(nnx.Module):
  """Multi-head / grouped-query self-attention with an optional KV cache."""

  def __init__(self, spec: ModelSpec, rngs: nnx.Rngs):
    self.spec = spec
    d, h, k, hd, dt = spec.embed_dim, spec.num_heads, spec.num_kv_heads, spec.head_dim, spec.weight_dtype
    out_std = spec.init_std / math.sqrt(2 * spec.num_layers)
    self.wq, self.wq_scale = _weight(spec, rngs, (d, h, hd), ("embed", "heads", "head_dim"), spec.init_std)
    self.wk, self.wk_scale = _weight(spec, rngs, (d, k, hd), ("embed", "kv_heads", "head_dim"), spec.init_std)
    self.wv, self.wv_scale = _weight(spec, rngs, (d, k, hd), ("embed", "kv_heads", "head_dim"), spec.init_std)
    self.wo, self.wo_scale = _weight(spec, rngs, (h, hd, d), ("heads", "head_dim", "embed"), out_std, n_in=2)
    q_axes, kv_axes = ("embed", "heads", "head_dim"), ("embed", "kv_heads", "head_dim")
    o_axes = ("heads", "head_dim", "embed")
    self.wq_lora_a, self.wq_lora_b = lora_lib.adapter_pair(spec, rngs, "wq", (d, h, hd), q_axes, 1)
    self.wk_lora_a, self.wk_lora_b = lora_lib.adapter_pair(spec, rngs, "wk", (d, k, hd), kv_axes, 1)
    self.wv_lora_a, self.wv_lora_b = lora_lib.adapter_pair(spec, rngs, "wv", (d, k, hd), kv_axes, 1)
    self.wo_lora_a, self.wo_lora_b = lora_lib.adapter_pair(spec, rngs, "wo", (h, hd, d), o_axes, 2)
    if spec.use_bias:
      self.bq = _param(rngs, (h, hd), ("heads", "head_dim"), dt, 0.0)
      self.bk = _param(rngs, (k, hd), ("kv_heads", "head_dim"), dt, 0.0)
      self.bv = _param(rngs, (k, hd), ("kv_heads", "head_dim"), dt, 0.0)
      self.bo = _param(rngs, (d,), ("embed",), dt, 0.0)
    else:
      self.bq = self.bk = self.bv = self.bo = None

  def _project(self, x, name: str, b):
    y = _linear(self, name, x)
    return y if b is None else y + b[...].astype(y.dtype)

  def __call__(self, x, positions, visibility, q_slots_start=None, kv_cache=None):
    """x [B, L, D]; positions [B, L]; visibility: `attention.Visibility`; kv_cache (k, v) each [B, S, K, hd] or None.

    Returns (y [B, L, D], updated kv_cache or None). With a cache, this call's keys/values are written at slots
    [q_slots_start, q_slots_start + L) and attention runs over all S slots (visibility hides the empty ones).
    """
    out, kv_cache = self.mix(x, positions, visibility, q_slots_start, kv_cache)
    return self.project_out(out), kv_cache

  def mix(self, x, positions, visibility, q_slots_start=None, kv_cache=None):
    """Everything before the output projection (same arguments as `__call__`): (heads [B, L, H, hd], kv_cache)."""
    spec = self.spec
    q = self._project(x, "wq", self.bq)
    k = self._project(x, "wk", self.bk)
    v = self._project(x, "wv", self.bv)
    if spec.family == "llama":
      inv_freq = spec.rope_frequencies()
      q, k = rope(q, positions, inv_freq), rope(k, positions, inv_freq)
    q = constrain(q, ("batch", "length", "heads", "head_dim"))
    if isinstance(visibility, (attention_lib.PagedVisibility, attention_lib.PagedGroups)):  # this layer's pages
      out, kv_cache = attention_lib.paged_step(q, k, v, kv_cache, visibility, spec.attention_impl,
                                                spec.matmul_impl)
      return checkpoint_name(out, "attention_out"), kv_cache
    heads_major = isinstance(kv_cache, attention_lib.HeadsMajorKV)
    if heads_major:  # [B * K, S, hd]: the new keys/values are transposed, the cache is read as it is
      start = (0, q_slots_start, 0)
      to_cache = lambda t: t.swapaxes(1, 2).reshape(-1, *t.shape[1:2], t.shape[3]).astype(kv_cache.k.dtype)  # noqa: E731
      k = jax.lax.dynamic_update_slice(kv_cache.k, to_cache(k), start)
      v = jax.lax.dynamic_update_slice(kv_cache.v, to_cache(v), start)
      kv_cache = attention_lib.HeadsMajorKV(k, v)
    elif kv_cache is not None:
      k_cache, v_cache = kv_cache
      start = (0, q_slots_start, 0, 0)
      k = jax.lax.dynamic_update_slice(k_cache, k.astype(k_cache.dtype), start)
      v = jax.lax.dynamic_update_slice(v_cache, v.astype(v_cache.dtype), start)
      kv_cache = (k, v)
    out = attention_lib.attend(q, k.astype(q.dtype), v.astype(q.dtype), visibility, impl=spec.attention_impl,
                               heads_major=heads_major, matmul_impl=spec.matmul_impl)
    return checkpoint_name(out, "attention_out"), kv_cache

  def project_out(self, heads):
    """heads [B, L, H, hd] -> [B, L, D] through wo (and bo)."""
    y = _linear(self, "wo", heads, n_in=2)
    return y if self.bo is None else y + self.bo[...].astype(y.dtype)


class MLP(nnx.Module):
  """GELU/ReLU MLP with biases (gpt) or SwiGLU without (llama). x [B, L, D] -> [B, L, D]."""

  def __init__(self, spec: ModelSpec, rngs: nnx.Rngs):
    self.spec = spec
    d, f, dt = spec.embed_dim, spec.mlp_dim, spec.weight_dtype
    out_std = spec.init_std / math.sqrt(2 * spec.num_layers)
    self.w_in, self.w_in_scale = _weight(spec, rngs, (d, f), ("embed", "mlp"), spec.init_std)
    self.w_gate, self.w_gate_scale = (_weight(spec, rngs, (d, f), ("embed", "mlp"), spec.init_std)
                                      if spec.family == "llama" else (None, None))
    self.w_out, self.w_out_scale = _weight(spec, rngs, (f, d), ("mlp", "embed"), out_std)
    self.w_in_lora_a, self.w_in_lora_b = lora_lib.adapter_pair(spec, rngs, "w_in", (d, f), ("embed", "mlp"), 1)
    self.w_gate_lora_a, self.w_gate_lora_b = (lora_lib.adapter_pair(spec, rngs, "w_gate", (d, f), ("embed", "mlp"), 1)
                                              if spec.family == "llama" else (None, None))
    self.w_out_lora_a, self.w_out_lora_b = lora_lib.adapter_pair(spec, rngs, "w_out", (f, d), ("mlp", "embed"), 1)
    self.b_in = _param(rngs, (f,), ("mlp",), dt, 0.0) if spec.has_mlp_bias else None
    self.b_gate = _param(rngs, (f,), ("mlp",), dt, 0.0) if spec.has_mlp_bias and spec.family == "llama" else None
    self.b_out = _param(rngs, (d,), ("embed",), dt, 0.0) if spec.has_mlp_bias else None

  def __call__(self, x):
    return self.project_out(self.hidden(x))

  def hidden(self, x):
    """The activated hidden layer, the input of w_out: x [B, L, D] -> [B, L, F]."""
    spec = self.spec
    h = _linear(self, "w_in", x)
    if self.b_in is not None:
      h = h + self.b_in[...].astype(h.dtype)
    if self.w_gate is not None:
      gate = _linear(self, "w_gate", x)
      if self.b_gate is not None:
        gate = gate + self.b_gate[...].astype(gate.dtype)
      h = jax.nn.silu(gate) * h
    else:
      h = ACTIVATIONS[spec.activation](h)
    return constrain(h, ("batch", "length", "mlp"))

  def project_out(self, h):
    """h [B, L, F] -> [B, L, D] through w_out (and b_out)."""
    y = _linear(self, "w_out", h)
    return y if self.b_out is None else y + self.b_out[...].astype(y.dtype)


MoEAux = dict[str, jax.Array]  # load_balance, router_z, dropped: float32 scalars summed over MoE blocks
MOE_AUX_KEYS = ("load_balance", "router_z", "dropped")


def _zero_aux() -> MoEAux:
  return {k: jnp.zeros((), jnp.float32) for k in MOE_AUX_KEYS}


Taps = dict[str, jax.Array]  # the inputs of a block's linear layers, by the names in `TAPS`

# Tap name -> the linear layers (parent, weight) that read it, in the block's order. "mlp_out" (the MLP's hidden
# layer) exists only in dense blocks; a MoE block's experts read "mlp_in" through their router.
TAPS = {
    "attn_in": (("attn", "wq"), ("attn", "wk"), ("attn", "wv")),  # [B, L, D] the (normed) attention input
    "attn_out": (("attn", "wo"),),  # [B, L, H * hd] the heads, before the output projection
    "mlp_in": (("mlp", "w_in"), ("mlp", "w_gate")),  # [B, L, D] the (normed) MLP or MoE input
    "mlp_out": (("mlp", "w_out"),),  # [B, L, F] the activated hidden layer
}


class Block(nnx.Module):
  """Residual block, pre-norm x + attn(norm(x)) then x + mlp(norm(x)), or post-norm norm(x + attn(x)) then
  norm(x + mlp(x)) (`spec.norm_position`); `moe` swaps the MLP for a `moe.MoE`. The wiring is written once, in
  `forward`, which also returns the inputs of every linear layer (`TAPS`) for calibration and quantization."""

  def __init__(self, spec: ModelSpec, rngs: nnx.Rngs, moe: bool = False):
    self.attn_norm = Norm(spec, rngs)
    self.attn = Attention(spec, rngs)
    self.mlp_norm = Norm(spec, rngs)
    self.mlp = None if moe else MLP(spec, rngs)
    self.moe = moe_lib.MoE(spec, rngs) if moe else None

  def __call__(self, x, positions, visibility, q_slots_start=None, kv_cache=None, between=None):
    """Returns (x [B, L, D], kv_cache, MoE auxiliary terms (zeros for a dense block)). `between`: an optional
    x -> x applied between the attention and the MLP (offloaded models order their next layer's copy by it)."""
    x, kv_cache, aux, _ = self.forward(x, positions, visibility, q_slots_start, kv_cache, between)
    return x, kv_cache, aux

  def forward(self, x, positions, visibility, q_slots_start=None, kv_cache=None, between=None):
    """`__call__` plus the block's taps: (x [B, L, D], kv_cache, MoE aux, taps {name in TAPS: input array}).
    The taps are intermediates the block computes anyway; under jit, unused ones cost nothing."""
    pre = self.attn_norm.spec.norm_position == "pre"
    taps: Taps = {}
    taps["attn_in"] = self.attn_norm(x) if pre else x
    heads, kv_cache = self.attn.mix(taps["attn_in"], positions, visibility, q_slots_start, kv_cache)
    taps["attn_out"] = heads.reshape(*heads.shape[:2], -1)
    y = self.attn.project_out(heads)
    x = x + y if pre else self.attn_norm(x + y)
    if between is not None:
      x = between(x)
    taps["mlp_in"] = self.mlp_norm(x) if pre else x
    if self.moe is not None:
      y, aux = self.moe(taps["mlp_in"], (visibility.q_segment_ids > 0))
    else:
      taps["mlp_out"] = self.mlp.hidden(taps["mlp_in"])
      y, aux = self.mlp.project_out(taps["mlp_out"]), _zero_aux()
    x = x + y if pre else self.mlp_norm(x + y)
    return constrain(x, ("batch", "length", "embed")), kv_cache, aux, taps


class BlockGroup(nnx.Module):
  """The scanned unit of MoE models: `moe_every` consecutive blocks, the last of which has the MoE MLP (Switch
  puts one every other block, Mixtral in every block). Caches are [moe_every, ...] stacks of per-block caches."""

  def __init__(self, spec: ModelSpec, rngs: nnx.Rngs):
    self.layers = nnx.List([Block(spec, rngs, moe=i == spec.moe_every - 1) for i in range(spec.moe_every)])

  def __call__(self, x, positions, visibility, q_slots_start=None, kv_cache=None, between=None):
    caches, total = [], _zero_aux()
    for i, block in enumerate(self.layers):
      x, cache, aux = block(x, positions, visibility, q_slots_start,
                            None if kv_cache is None else jax.tree.map(lambda a, i=i: a[i], kv_cache),
                            between if i == 0 else None)
      caches.append(cache)
      total = jax.tree.map(jnp.add, total, aux)
    return x, (None if kv_cache is None else jax.tree.map(lambda *a: jnp.stack(a), *caches)), total


class Transformer(nnx.Module):
  """Decoder-only language model.

  `__call__(inputs, positions, segment_ids)` -> logits [B, L, vocab] float32 for training and scoring;
  `init_cache` + `extend` run prefill and decode steps against a KV cache.
  """

  def __init__(self, spec: ModelSpec, *, rngs: nnx.Rngs):
    self.spec = spec
    dt = spec.weight_dtype
    # Quantized: int8 rows with one scale per vocabulary entry, which is also the tied head's per-output scale.
    token_dim = spec.embed_proj_dim or spec.embed_dim
    self.embed, self.embed_scale = _weight(spec, rngs, (spec.vocab_size, token_dim), ("vocab", "embed"),
                                           spec.init_std, scale_axes=(0,), block=False)
    projected = spec.embed_proj_dim not in (0, spec.embed_dim)  # OPT-350m: tokens live in a narrower space
    self.project_in = _param(rngs, (token_dim, spec.embed_dim), (None, "embed"), dt, spec.init_std) if projected else None
    self.project_out = _param(rngs, (spec.embed_dim, token_dim), ("embed", None), dt, spec.init_std) if projected else None
    self.pos_embed = (_param(rngs, (spec.max_len, spec.embed_dim), (None, "embed"), dt, spec.init_std / 2)
                      if spec.family == "gpt" else None)

    if spec.num_experts and spec.num_layers % spec.moe_every:
      raise ValueError(f"num_layers={spec.num_layers} must be a multiple of moe_every={spec.moe_every}")
    unit = BlockGroup if spec.num_experts else Block

    @nnx.split_rngs(splits=spec.num_layers // spec.layers_per_unit)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers", "logical_axes": "layers"})
    def make_blocks(r: nnx.Rngs) -> Block:
      return unit(spec, r)

    self.blocks = make_blocks(rngs)
    self.final_norm = Norm(spec, rngs) if spec.norm_position == "pre" else None
    self.head, self.head_scale = ((None, None) if spec.tie_embeddings else
                                  _weight(spec, rngs, (token_dim, spec.vocab_size), ("embed", "vocab"),
                                          spec.init_std, block=False))

  # -- public API -------------------------------------------------------------------------------------------------

  def __call__(self, inputs: jax.Array, positions: jax.Array | None = None,
               segment_ids: jax.Array | None = None) -> jax.Array:
    """inputs [B, L] int32; positions [B, L] (default 0..L-1); segment_ids [B, L] (default all 1; 0 = padding).

    Returns logits [B, L, vocab] float32. Tokens attend causally within their own segment only.
    """
    b, l = inputs.shape
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(l, dtype=jnp.int32), (b, l))
    return self.forward_with_aux(inputs, positions, segment_ids)[0]

  def forward_with_aux(self, inputs: jax.Array, positions: jax.Array | None = None,
                       segment_ids: jax.Array | None = None) -> tuple[jax.Array, MoEAux]:
    """`__call__` plus the MoE auxiliary terms averaged over MoE blocks (zeros for dense models): load_balance,
    router_z and the dropped share of assignments."""
    x, aux = self.features_with_aux(inputs, positions, segment_ids)
    return self.head_logits(x), aux

  def features_with_aux(self, inputs: jax.Array, positions: jax.Array | None = None,
                        segment_ids: jax.Array | None = None) -> tuple[jax.Array, MoEAux]:
    """`forward_with_aux` without the output head: the final features [B, L, D'] (D' = embed_proj_dim or
    embed_dim) that `head_logits` turns into logits, for losses that run the head in chunks."""
    b, l = inputs.shape
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(l, dtype=jnp.int32), (b, l))
    if segment_ids is None:
      segment_ids = jnp.ones((b, l), jnp.int32)
    visibility = attention_lib.Visibility.causal_self(segment_ids)
    x, _, aux = self._features(inputs, positions, visibility, None, None)
    moe_blocks = max(self.spec.num_layers // self.spec.moe_every, 1) if self.spec.num_experts else 1
    return x, {k: v / moe_blocks for k, v in aux.items()}

  def init_cache(self, batch: int, length: int, dtype=None, per_layer: bool = False) -> Cache:
    """An empty KV cache of `length` slots: k/v [layers, batch, length, kv_heads, head_dim] in `dtype`.

    `per_layer=True` (for `unstacked()` models, as decode loops use) keeps one (k, v) pair per layer unit under "kv"
    instead, so each step updates the cache in place rather than slicing and restacking all of it. With
    `attention_impl=xla` and a float32 cache those pairs are `attention.HeadsMajorKV` [batch * kv_heads, length, head_dim], the layout the
    attention dots read without transposing the whole cache at every step."""
    s = self.spec
    dtype = dtype or s.compute_dtype
    meta = {"segment_ids": jnp.zeros((batch, length), jnp.int32), "index": jnp.zeros((), jnp.int32)}
    if s.offload != "none":  # offloaded models stay stacked (see `unstacked`): a stacked cache, on the host for kv
      shape = (s.num_layers, batch, length, s.num_kv_heads, s.head_dim)
      kv = {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}
      if "weights" in offload_lib.parts(s.offload) and s.offload_ahead:  # layer 0, copied in ahead (`_scan_offloaded`)
        meta["next_layer"] = offload_lib.first_layer(nnx.state(self.blocks))
      return {**(offload_lib.to_host(kv) if "kv" in offload_lib.parts(s.offload) else kv), **meta}
    if per_layer:
      # float32 only: XLA's CPU dot thunk rejects bf16 x bf16 -> f32 for these batched dots (bench_decode, batch 8)
      heads_major = s.attention_impl == "xla" and jnp.dtype(dtype) == jnp.float32
      shape = ((batch * s.num_kv_heads, length, s.head_dim) if heads_major else
               (batch, length, s.num_kv_heads, s.head_dim))
      shape = (s.layers_per_unit, *shape) if s.num_experts else shape  # BlockGroup caches, even of one block
      pair = attention_lib.HeadsMajorKV if heads_major else (lambda k, v: (k, v))
      units = s.num_layers // s.layers_per_unit
      return {"kv": [pair(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)) for _ in range(units)], **meta}
    shape = (s.num_layers, batch, length, s.num_kv_heads, s.head_dim)
    return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype), **meta}

  def extend(self, inputs: jax.Array, positions: jax.Array, segment_ids: jax.Array,
             cache: Cache) -> tuple[jax.Array, Cache]:
    """Appends L tokens to the cache (prefill when L > 1, a decode step when L == 1).

    inputs/positions/segment_ids [B, L] int32 (segment 0 marks left padding that nothing attends to); the tokens are
    written at slots [index, index + L). Returns (logits [B, L, vocab] float32, updated cache).
    """
    b, l = inputs.shape
    slots = cache["segment_ids"].shape[1]
    if l > slots:
      raise ValueError(f"extend got {l} tokens but the cache has {slots} slots; allocate a longer cache")
    start = cache["index"]  # the caller keeps index + L <= slots (dynamic_update_slice would clamp past the end)
    kv_segments = jax.lax.dynamic_update_slice(cache["segment_ids"], segment_ids.astype(jnp.int32), (0, start))
    q_slots = jnp.broadcast_to(start + jnp.arange(l, dtype=jnp.int32), (b, l))
    # One sequence per row: a live query sees every filled slot up to its own; padding queries see nothing.
    live = lambda ids: jnp.minimum(ids, 1).astype(jnp.int32)  # noqa: E731
    visibility = attention_lib.Visibility(live(segment_ids), live(kv_segments), q_slots)
    if "kv" in cache:  # per-layer cache (see `init_cache`)
      if not isinstance(self.blocks, nnx.List):
        raise ValueError("a per_layer cache needs per-layer blocks: call extend on model.unstacked()")
      logits, kv, _ = self._forward(inputs, positions, visibility, start, list(cache["kv"]))
      return logits, {"kv": kv, "segment_ids": kv_segments, "index": start + l}
    if "next_layer" in cache:  # offloaded weights: (k, v, the first layer copied in by the previous call)
      logits, (k, v, nxt), _ = self._forward(inputs, positions, visibility, start,
                                             (cache["k"], cache["v"], cache["next_layer"]))
      return logits, {"k": k, "v": v, "segment_ids": kv_segments, "index": start + l, "next_layer": nxt}
    logits, (k, v), _ = self._forward(inputs, positions, visibility, start, (cache["k"], cache["v"]))
    return logits, {"k": k, "v": v, "segment_ids": kv_segments, "index": start + l}

  def init_pages(self, num_pages: int, page_size: int, dtype=None) -> list[tuple[jax.Array, jax.Array]]:
    """An empty paged KV pool, one (k, v) pair per scanned unit (a block, or a MoE block group): each
    [num_pages, page_size, kv_heads, head_dim] ([layers_per_unit, ...] for MoE models) in `dtype`. Separate
    per-unit arrays let every decode step update the pool in place (a stacked pool would be sliced and restacked,
    copying all of it at every step)."""
    s = self.spec
    shape = (num_pages, page_size, s.num_kv_heads, s.head_dim)
    if s.num_experts:  # BlockGroup units, even of one block
      shape = (s.layers_per_unit, *shape)
    zeros = lambda: jnp.zeros(shape, dtype or s.compute_dtype)  # noqa: E731
    return [(zeros(), zeros()) for _ in range(s.num_layers // s.layers_per_unit)]

  def extend_paged(self, inputs: jax.Array, live: jax.Array, positions: jax.Array, page_table: jax.Array,
                   lengths: jax.Array, pages: list) -> tuple[jax.Array, list]:
    """Appends L tokens per row to a paged KV pool (`infer/engine.py`): prefill chunks and decode steps alike.

    Call it on `unstacked()` models. inputs/live/positions [B, L] int32 (live 0 marks padding; a token's position is
    also its slot); page_table [B, M] int32; lengths [B] int32 live slots after the write; pages from `init_pages`.
    Returns (logits [B, L, vocab] float32, updated pages)."""
    if not isinstance(self.blocks, nnx.List):
      raise ValueError("extend_paged runs on per-layer blocks: call it on model.unstacked()")
    visibility = attention_lib.PagedVisibility(live.astype(jnp.int32), positions.astype(jnp.int32),
                                               page_table.astype(jnp.int32), lengths.astype(jnp.int32))
    logits, pages, _ = self._forward(inputs, positions, visibility, None, list(pages))
    return logits, pages

  def extend_paged_groups(self, groups: Sequence[tuple[jax.Array, ...]], pages: list) -> tuple[jax.Array, list]:
    """One step over several groups of rows at once (mixed batches: prefill chunks beside decode tokens).

    groups: (inputs, live, positions, page_table, lengths, last_index) per group, each as in `extend_paged` for that
    group's [B_g, L_g] rows, and last_index [B_g] int32: the token whose logits row b returns. The groups' tokens run
    through each layer together (`attention.PagedGroups`). Returns (logits [sum B_g, vocab] float32, pages)."""
    if not isinstance(self.blocks, nnx.List):
      raise ValueError("extend_paged_groups runs on per-layer blocks: call it on model.unstacked()")
    as_int = lambda a: jnp.asarray(a, jnp.int32)  # noqa: E731
    visibility = attention_lib.PagedGroups(tuple(
        attention_lib.PagedVisibility(as_int(live), as_int(positions), as_int(table), as_int(lengths))
        for _, live, positions, table, lengths, _ in groups))
    flat = lambda i: jnp.concatenate([as_int(g[i]).reshape(-1) for g in groups])[None]  # noqa: E731
    x, pages, _ = self._features(flat(0), flat(2), visibility, None, list(pages))
    offsets = itertools.accumulate((g[0].size for g in groups[:-1]), initial=0)
    picks = jnp.concatenate([offset + jnp.arange(g[0].shape[0]) * g[0].shape[1] + as_int(g[5])
                             for offset, g in zip(offsets, groups)])
    return self.head_logits(x[:, picks])[0], pages

  # -- internals --------------------------------------------------------------------------------------------------

  def embed_tokens(self, inputs: jax.Array, positions: jax.Array) -> jax.Array:
    """Token (plus learned position, gpt) embeddings. inputs/positions [B, L] int32 -> [B, L, D] compute dtype."""
    spec = self.spec
    x = jnp.take(self.embed[...], inputs, axis=0).astype(jnp.float32)
    if self.embed_scale is not None:
      x = x * jnp.take(self.embed_scale[...], inputs, axis=0)[..., None]
    x = x.astype(spec.compute_dtype)
    if self.project_in is not None:
      x = _matmul(spec, x, self.project_in)
    if self.pos_embed is not None:
      x = x + jnp.take(self.pos_embed[...], positions, axis=0).astype(spec.compute_dtype)
    return constrain(x, ("batch", "length", "embed"))

  def _forward(self, inputs, positions, visibility, start, kv_cache):
    x, kv_cache, aux = self._features(inputs, positions, visibility, start, kv_cache)
    return self.head_logits(x), kv_cache, aux

  def _features(self, inputs, positions, visibility, start, kv_cache):
    x = self.embed_tokens(inputs, positions)
    x, kv_cache, aux = self._run_blocks(x, positions, visibility, start, kv_cache)
    if self.final_norm is not None:
      x = self.final_norm(x)
    if self.project_out is not None:
      x = _matmul(self.spec, x, self.project_out)
    return x, kv_cache, aux

  def head_logits(self, x: jax.Array) -> jax.Array:
    """Final features [B, L, D'] -> logits [B, L, vocab] float32 (tied embedding or separate head, float or int8)."""
    spec = self.spec
    if self.head is not None and self.head_scale is not None:
      logits = _matmul(spec, x, self.head, self.head_scale).astype(jnp.float32)
    elif self.head is not None:
      logits = jnp.einsum("bld,dv->blv", x, self.head[...].astype(x.dtype), preferred_element_type=jnp.float32)
    elif self.embed_scale is not None:
      logits = _matmul(spec, x, self.embed, self.embed_scale, transposed=True).astype(jnp.float32)
    elif spec.mixed_matmuls:  # tied head: x [.., D] against the embedding rows [V, D]
      flat = mixed_matmul.matmul(x.reshape(-1, x.shape[-1]), self.embed[...], spec.matmul_dtype, True)
      logits = flat.reshape(*x.shape[:-1], flat.shape[-1])
    else:
      logits = jnp.einsum("bld,vd->blv", x, self.embed[...].astype(x.dtype), preferred_element_type=jnp.float32)
    return constrain(logits, ("batch", "length", "vocab"))

  def unstacked(self) -> "Transformer":
    """A copy whose blocks are separate per-layer modules (the stacked weights sliced once, here).

    Decode loops call this outside their loop: slicing stacked weights inside the loop would copy every layer's
    weights at every step (XLA on CPU does not alias the slices), which costs more than the decode matmuls.
    Already unstacked models, and offloaded ones (`model/offload.py`: their scan streams one layer per
    iteration from host memory), are returned as they are."""
    if isinstance(self.blocks, nnx.List) or self.spec.offload != "none":
      return self
    model = nnx.merge(*nnx.split(self))
    graphdef, params = nnx.split(model.blocks)
    model.blocks = nnx.List([nnx.merge(graphdef, jax.tree.map(lambda a, i=i: a[i], params))
                             for i in range(self.spec.num_layers // self.spec.layers_per_unit)])
    return model

  def _run_blocks(self, x, positions, visibility, start, kv_cache):
    """x [B, L, D] through every block. kv_cache: None, a list of per-unit caches or page pools (updated in place,
    for `unstacked()` models), or a stacked (k, v) pair [layers, ...]. Returns (x, kv_cache as given, MoE aux)."""
    if isinstance(kv_cache, list):
      return self._run_unit_list(x, positions, visibility, start, kv_cache)
    spec = self.spec
    units = spec.num_layers // spec.layers_per_unit
    prefetched = None
    if isinstance(kv_cache, tuple) and len(kv_cache) == 3:  # (k, v, next layer): see `extend`
      kv_cache, prefetched = kv_cache[:2], kv_cache[2]
    if kv_cache is not None and spec.num_experts:  # [layers, ...] -> [units, layers per unit, ...]
      kv_cache = jax.tree.map(lambda a: a.reshape(units, spec.layers_per_unit, *a.shape[1:]), kv_cache)
    if isinstance(self.blocks, nnx.List):  # see `unstacked`
      per_unit = None if kv_cache is None else [jax.tree.map(lambda a, i=i: a[i], kv_cache) for i in range(units)]
      x, per_unit, aux = self._run_unit_list(x, positions, visibility, start, per_unit)
      kv_cache = None if kv_cache is None else jax.tree.map(lambda *a: jnp.stack(a), *per_unit)
    elif pipeline.stages_of_active_mesh() > 1 and kv_cache is None:  # GPipe over the mesh's pipeline axis
      return pipeline.run_blocks(self, x, positions, visibility), None, _zero_aux()
    elif "weights" in offload_lib.parts(spec.offload) and spec.offload_ahead:
      x, kv_cache, aux, prefetched = self._scan_offloaded(x, positions, visibility, start, kv_cache, prefetched)
    else:
      graphdef, params = nnx.split(self.blocks)
      x, kv_cache, aux = self.scan_units(graphdef, params, x, positions, visibility, start, kv_cache)
    if kv_cache is not None and spec.num_experts:
      kv_cache = jax.tree.map(lambda a: a.reshape(spec.num_layers, *a.shape[2:]), kv_cache)
    if prefetched is not None and kv_cache is not None:
      kv_cache = (*kv_cache, prefetched)
    return x, kv_cache, aux

  def _run_unit_list(self, x, positions, visibility, start, caches):
    """Per-layer blocks one after another; caches: one entry per unit, or None. Returns (x, caches, MoE aux)."""
    aux, new_caches = _zero_aux(), []
    for i, block in enumerate(self.blocks):
      x, cache, block_aux = block(x, positions, visibility, start, None if caches is None else caches[i])
      new_caches.append(cache)
      aux = jax.tree.map(jnp.add, aux, block_aux)
    return x, (None if caches is None else new_caches), aux

  def scan_units(self, graphdef, params, x, positions, visibility, start=None, kv_cache=None):
    """Runs stacked units (params [units, ...], e.g. one pipeline stage's share) over x [B, L, D] with the configured
    remat policy, scanned or unrolled. Returns (x, stacked unit caches or None, summed MoE aux)."""
    spec = self.spec
    aux = _zero_aux()
    units = jax.tree.leaves(params)[0].shape[0]

    offloaded = offload_lib.parts(spec.offload)
    packed = getattr(self, "offload_packed", ())  # 8-bit weights held as 32-bit words on the host (model/offload.py)

    def body(carry, layer):
      x, aux = carry
      block_params, layer_cache, index = layer
      if "weights" in offloaded:  # offload_ahead=False: this unit's slice of the host stack, copied in by its iteration
        block_params = offload_lib.unpack_layer(offload_lib.to_device(block_params), packed)
      if "kv" in offloaded and layer_cache is not None:
        layer_cache = offload_lib.to_device(layer_cache)
      block = nnx.merge(graphdef, block_params)
      with lora_lib.layer_scope(index):  # each layer's adapters draw their own dropout masks
        y, layer_cache, block_aux = block(x, positions, visibility, start, layer_cache)
      if "kv" in offloaded and layer_cache is not None:  # back to the host stack layer by layer: the scan's stacked
        layer_cache = offload_lib.to_host(layer_cache)  # output then lives in host memory, never whole on the device
      return (y, jax.tree.map(jnp.add, aux, block_aux)), layer_cache

    if spec.remat != "none":
      body = jax.checkpoint(body, policy=REMAT_POLICIES[spec.remat], prevent_cse=not spec.scan_layers)
    if spec.scan_layers:
      (x, aux), kv_cache = jax.lax.scan(body, (x, aux), (params, kv_cache, jnp.arange(units)))
      return x, kv_cache, aux
    outputs = []
    for i in range(units):
      layer = jax.tree.map(lambda a: a[i], (params, kv_cache))
      (x, aux), layer_cache = body((x, aux), (*layer, i))
      outputs.append(layer_cache)
    if kv_cache is None:
      return x, None, aux
    return x, jax.tree.map(lambda *a: jnp.stack(a), *outputs), aux

  def _scan_offloaded(self, x, positions, visibility, start, kv_cache, prefetched):
    """The layer scan of a model whose weights are in host memory (`model/offload.py`), one layer ahead: iteration
    i computes layer i with the weights the previous iteration copied in and copies layer i + 1 in while it does
    (the host stack is stored rolled by one, so the scan's own slice i is layer i + 1). The copy is made to finish
    between layer i's attention and its MLP (an optimization barrier with the attention's output), which is what
    lets XLA's TPU compiler start it at the top of the iteration, beside the attention; carried to the end, it was
    scheduled after the layer. The last iteration copies layer 0, returned for the next call (`extend` keeps it in
    the cache; without one, `prefetched` is None and layer 0 is copied in first). Lowered for a CPU, where host and
    device memory are one RAM and there is nothing to overlap, each iteration indexes its own layer instead (the
    carried copy cost a memcpy per layer: GPT-2 batch-1 decode at 0.25x of resident, against 0.61x). kv_cache: stacked
    (k, v) or None. Returns (x, kv_cache, summed MoE aux, layer 0 on the device)."""
    spec = self.spec
    offloaded = offload_lib.parts(spec.offload)
    graphdef, params = nnx.split(self.blocks)
    packed = getattr(self, "offload_packed", ())  # 8-bit weights held as 32-bit words on the host
    units = jax.tree.leaves(params)[0].shape[0]
    if prefetched is None:
      prefetched = offload_lib.first_layer(params)

    def layer_step(x, aux, weights, layer_cache, index, between=None):
      if "kv" in offloaded and layer_cache is not None:
        layer_cache = offload_lib.to_device(layer_cache)
      block = nnx.merge(graphdef, offload_lib.unpack_layer(weights, packed))
      with lora_lib.layer_scope(index):
        y, layer_cache, block_aux = block(x, positions, visibility, start, layer_cache, between)
      if "kv" in offloaded and layer_cache is not None:
        layer_cache = offload_lib.to_host(layer_cache)
      return y, jax.tree.map(jnp.add, aux, block_aux), layer_cache

    def ahead(prefetched):
      def body(carry, layer):
        x, aux, current = carry
        host_next, layer_cache, index = layer
        copied = offload_lib.to_device(host_next)  # layer index + 1 (mod units)

        def between(h):  # the copy done before the MLP: started beside the attention
          return jax.lax.optimization_barrier((copied, h))[1]

        y, aux, layer_cache = layer_step(x, aux, current, layer_cache, index, between)
        return (y, aux, copied), layer_cache

      if spec.remat != "none":
        body = jax.checkpoint(body, policy=REMAT_POLICIES[spec.remat], prevent_cse=False)
      (y, aux, nxt), caches = jax.lax.scan(body, (x, _zero_aux(), prefetched), (params, kv_cache, jnp.arange(units)))
      return y, caches, aux, nxt

    def in_place(prefetched):  # CPU: host and device memory are one RAM, so copying ahead would only add a copy
      def body(carry, layer):
        x, aux = carry
        layer_cache, index = layer  # layer index sits in slot index - 1 of the rolled stack
        weights = jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, (index - 1) % units, keepdims=False), params)
        y, aux, layer_cache = layer_step(x, aux, offload_lib.to_device(weights), layer_cache, index)
        return (y, aux), layer_cache

      if spec.remat != "none":
        body = jax.checkpoint(body, policy=REMAT_POLICIES[spec.remat], prevent_cse=False)
      (y, aux), caches = jax.lax.scan(body, (x, _zero_aux()), (kv_cache, jnp.arange(units)))
      return y, caches, aux, prefetched

    x, kv_cache, aux, nxt = jax.lax.platform_dependent(prefetched, cpu=in_place, default=ahead)
    return x, kv_cache, aux, nxt


def graphdef(spec: ModelSpec) -> nnx.GraphDef:
  """The static structure of the model of `spec` (no parameters allocated)."""
  return nnx.split(abstract_model(spec))[0]


def abstract_model(spec: ModelSpec) -> Transformer:
  """The model of `spec` with ShapeDtypeStruct parameters (nnx.eval_shape): for shapes, shardings and counting."""
  return nnx.eval_shape(lambda: Transformer(spec, rngs=nnx.Rngs(params=0)))


def init_params(spec: ModelSpec, seed: int) -> dict:
  """Freshly initialised parameters as a nested dict of arrays (call under jit to build them on device)."""
  return nnx.to_pure_dict(nnx.state(Transformer(spec, rngs=nnx.Rngs(params=seed)), nnx.Param))


def from_params(spec: ModelSpec, params) -> Transformer:
  """The model of `spec` around a pure parameter dict (as `init_params`, checkpoints and compressors give)."""
  return nnx.merge(graphdef(spec), params)
