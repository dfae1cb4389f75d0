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


def _block_matmul_params(s: ModelSpec) -> int:
  attn = s.embed_dim * s.head_dim * (2 * s.num_heads + 2 * s.num_kv_heads)
  mlp = s.embed_dim * s.mlp_dim * (3 if s.family == "llama" else 2)
  return attn + mlp


def param_count(s: ModelSpec) -> int:
  """Total number of parameters (embeddings, norms and biases included)."""
  d = s.embed_dim
  norms_per_block = 2 * d * (2 if s.family == "gpt" else 1)
  biases_per_block = (s.head_dim * (s.num_heads + 2 * s.num_kv_heads) + s.mlp_dim + 2 * d) if s.use_bias else 0
  block = _block_matmul_params(s) + norms_per_block + biases_per_block
  total = s.num_layers * block + s.vocab_size * d + d * (2 if s.family == "gpt" else 1)
  if s.family == "gpt":
    total += s.max_len * d
  if not s.tie_embeddings:
    total += d * s.vocab_size
  return total


def matmul_param_count(s: ModelSpec) -> int:
  """Parameters that take part in a matmul for every token: block weights plus the output projection."""
  return s.num_layers * _block_matmul_params(s) + s.embed_dim * s.vocab_size


def flops_per_token(s: ModelSpec, context: int, training: bool = True) -> float:
  """Forward (training=False) or forward+backward FLOPs per token at sequence length `context`."""
  forward = 2 * matmul_param_count(s) + 4 * s.num_layers * s.num_heads * s.head_dim * context
  return float(3 * forward if training else forward)


def tree_param_count(model_or_state) -> int:
  """Counts the parameters of an NNX module or state (concrete or abstract) directly from its leaves."""
  state = nnx.state(model_or_state, nnx.Param) if isinstance(model_or_state, nnx.Module) else model_or_state
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(state)))
