"""Parameter and FLOP counts from the model's hyper-parameters (`ModelSpec`), checked against the parameter tree.

FLOPs follow the PaLM appendix-B convention: a forward pass costs 2 FLOPs per multiply-accumulate of every matmul
weight (embedding lookups excluded, the output projection included, tied or not) plus 4 * layers * heads * head_dim *
context for the attention scores and the weighted sum (full, not halved for causality); training is 3x forward.
"""

from __future__ import annotations

import jax
import numpy as np
from flax import nnx

from model.transformer import ModelSpec


def _attn_params(s: ModelSpec) -> int:
  return s.embed_dim * s.head_dim * (2 * s.num_heads + 2 * s.num_kv_heads)


def _mlp_params(s: ModelSpec, width: int) -> int:
  return s.embed_dim * width * (3 if s.family == "llama" else 2)


def _moe_blocks(s: ModelSpec) -> int:
  return s.num_layers // s.moe_every if s.num_experts else 0


def param_count(s: ModelSpec) -> int:
  """Total number of parameters (embeddings, norms, biases and every expert included)."""
  d = s.embed_dim
  token_dim = s.embed_proj_dim or d
  moe_blocks = _moe_blocks(s)
  norm = d * (2 if s.family == "gpt" else 1)
  attn_biases = s.num_layers * (s.head_dim * (s.num_heads + 2 * s.num_kv_heads) + d) if s.use_bias else 0
  mlp_bias_width = s.mlp_dim * (2 if s.family == "llama" else 1) + d
  mlp_biases = (s.num_layers - moe_blocks) * mlp_bias_width if s.has_mlp_bias else 0
  total = (s.num_layers * _attn_params(s) + (s.num_layers - moe_blocks) * _mlp_params(s, s.mlp_dim)
           + moe_blocks * (s.num_experts * _mlp_params(s, s.expert_mlp_dim) + d * s.num_experts)
           + s.num_layers * 2 * norm + attn_biases + mlp_biases + s.vocab_size * token_dim)
  if s.norm_position == "pre":
    total += norm  # the final norm
  if token_dim != d:
    total += 2 * token_dim * d  # project_in and project_out
  if s.family == "gpt":
    total += s.max_len * d
  if not s.tie_embeddings:
    total += token_dim * s.vocab_size
  return total


def matmul_param_count(s: ModelSpec) -> int:
  """Parameters that take part in a matmul for every token: attention, dense MLPs, the router and the k active
  experts of each MoE block, plus the output projection."""
  moe_blocks = _moe_blocks(s)
  return (s.num_layers * _attn_params(s) + (s.num_layers - moe_blocks) * _mlp_params(s, s.mlp_dim)
          + moe_blocks * (s.experts_per_token * _mlp_params(s, s.expert_mlp_dim) + s.embed_dim * s.num_experts)
          + (s.embed_proj_dim or s.embed_dim) * s.vocab_size
          + (2 * s.embed_proj_dim * s.embed_dim if s.embed_proj_dim not in (0, s.embed_dim) else 0))


def flops_per_token(s: ModelSpec, context: int, training: bool = True) -> float:
  """Forward (training=False) or forward+backward FLOPs per token at sequence length `context`."""
  forward = 2 * matmul_param_count(s) + 4 * s.num_layers * s.num_heads * s.head_dim * context
  return float(3 * forward if training else forward)


def tree_param_count(model_or_state) -> int:
  """Counts the parameters of an NNX module or state (concrete or abstract) directly from its leaves."""
  state = nnx.state(model_or_state, nnx.Param) if isinstance(model_or_state, nnx.Module) else model_or_state
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(state)))
