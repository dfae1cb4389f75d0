"""Attention math and its implementation switch.

`attend` is the single entry point the model calls; `impl="xla"` is the plain-jnp reference every kernel is tested
against. Masks are built from segment ids and slots, so the same code serves packed training (documents never see each
other), padded batches (segment 0 is padding) and KV-cache decoding (slots beyond the write index are empty).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

NEG_INF = -0.7 * float(jnp.finfo(jnp.float32).max)  # finite, so fully masked (padding) rows stay NaN-free


def make_mask(q_segment_ids: jax.Array, kv_segment_ids: jax.Array, q_slots: jax.Array) -> jax.Array:
  """Boolean mask [batch, 1, q_len, kv_len]: same non-zero segment and causal in slot order.

  q_segment_ids [B, Lq] int32, kv_segment_ids [B, Lk] int32 (0 = padding/empty), q_slots [B, Lq] int32: the kv slot of
  each query (kv slot j is visible to a query at slot s when j <= s).
  """
  kv_slots = jnp.arange(kv_segment_ids.shape[1], dtype=jnp.int32)
  causal = kv_slots[None, None, :] <= q_slots[:, :, None]
  same = (q_segment_ids[:, :, None] == kv_segment_ids[:, None, :]) & (kv_segment_ids[:, None, :] != 0)
  return (causal & same)[:, None]


def xla_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, sm_scale: float) -> jax.Array:
  """Reference grouped-query attention.

  q [B, Lq, H, D], k/v [B, Lk, K, D] with K dividing H, mask [B, 1, Lq, Lk] bool -> [B, Lq, H, D] in q's dtype.
  Logits and softmax in float32.
  """
  b, lq, h, d = q.shape
  kv_heads = k.shape[2]
  q = q.reshape(b, lq, kv_heads, h // kv_heads, d)
  logits = jnp.einsum("bqkgd,bskd->bkgqs", q, k, preferred_element_type=jnp.float32) * sm_scale
  logits = jnp.where(mask[:, :, None], logits, NEG_INF)
  probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  out = jnp.einsum("bkgqs,bskd->bqkgd", probs, v, preferred_element_type=jnp.float32)
  return out.reshape(b, lq, h, d).astype(q.dtype)


IMPLS = {"xla": xla_attention}


def attend(q, k, v, mask, *, impl: str = "xla", sm_scale: float | None = None) -> jax.Array:
  """Dispatches to the configured attention implementation; see `xla_attention` for shapes."""
  if impl not in IMPLS:
    raise ValueError(f"attention_impl={impl!r} is not available; choose one of {sorted(IMPLS)}")
  scale = sm_scale if sm_scale is not None else q.shape[-1] ** -0.5
  return IMPLS[impl](q, k, v, mask, scale)
