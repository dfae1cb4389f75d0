"""Decode attention in Pallas: one new query per sequence against a KV cache with per-sequence valid ranges.

`decode_attention(q, k, v, starts, ends)` takes q [B, H, D] and a cache k, v [B, S, K, D] (K | H, grouped-query) where
row b's valid slots are starts[b] <= slot < ends[b] (left padding before `starts`, empty slots after `ends`). Each
program owns one (row, kv head) pair and all H/K query heads that share it, and walks only the key blocks that overlap
the row's valid range, so a ragged batch costs what its real tokens cost. Online softmax in float32; rows with an empty
range return zeros. Interpret mode on CPU, Triton on GPU (query heads padded to 16 rows for the tensor-core dot).

`reference_decode_attention` is the plain-jnp definition the kernel is tested against.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from model.kernels.common import (NEG_INF, compiler_params, online_softmax_finish, online_softmax_init,
                                  online_softmax_step, pad_axis)

DEFAULT_BLOCK_K = 128


def reference_decode_attention(q, k, v, starts, ends, *, sm_scale=None):
  """Plain-jnp decode attention with the same contract. Returns [B, H, D] in q's dtype."""
  b, h, d = q.shape
  s_len, kv_heads = k.shape[1], k.shape[2]
  scale = d**-0.5 if sm_scale is None else sm_scale
  qg = q.reshape(b, kv_heads, h // kv_heads, d)
  s = jnp.einsum("bkgd,bskd->bkgs", qg, k, preferred_element_type=jnp.float32) * scale
  slots = jnp.arange(s_len)[None, :]
  valid = ((slots >= starts[:, None]) & (slots < ends[:, None]))[:, None, None, :]
  s = jnp.where(valid, s, NEG_INF)
  p = jnp.where(valid, jnp.exp(s - s.max(-1, keepdims=True)), 0.0)
  p = p / jnp.maximum(p.sum(-1, keepdims=True), 1e-30)
  out = jnp.einsum("bkgs,bskd->bkgd", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
  return out.reshape(b, h, d).astype(q.dtype)


def _decode_kernel(starts_ref, ends_ref, q_ref, k_ref, v_ref, o_ref, *, sm_scale, block_k):
  b = pl.program_id(0)
  start, end = starts_ref[b], ends_ref[b]
  q = q_ref[...]  # [G, D]

  def body(j, carry):
    k_start = pl.multiple_of(j * block_k, block_k)
    keys = pl.ds(k_start, block_k)
    slot = k_start + jax.lax.broadcasted_iota(jnp.int32, (q.shape[0], block_k), 1)
    valid = (slot >= start) & (slot < end)
    return online_softmax_step(carry, q, k_ref[keys, :], v_ref[keys, :], valid, sm_scale)

  carry = jax.lax.fori_loop(start // block_k, pl.cdiv(end, block_k), body, online_softmax_init(*q.shape))
  o_ref[...] = online_softmax_finish(carry).astype(o_ref.dtype)


def decode_attention(q: jax.Array, k: jax.Array, v: jax.Array, starts: jax.Array, ends: jax.Array, *,
                     sm_scale: float | None = None, block_k: int | None = None,
                     interpret: bool | None = None) -> jax.Array:
  """q [B, H, D]; k, v [B, S, K, D] with K | H; starts, ends [B] int32 (valid slots [start, end)) -> [B, H, D]."""
  if q.ndim != 3 or k.ndim != 4 or k.shape != v.shape:
    raise ValueError(f"decode_attention expects q [B, H, D] and k, v [B, S, K, D]; got {q.shape}, {k.shape}, {v.shape}")
  b, h, d = q.shape
  s_len, kv_heads = k.shape[1], k.shape[2]
  if k.shape[0] != b or k.shape[3] != d or h % kv_heads:
    raise ValueError(f"cache shape {k.shape} does not match q {q.shape}: need the same batch and head_dim, and kv "
                     "heads dividing query heads")
  if starts.shape != (b,) or ends.shape != (b,):
    raise ValueError(f"starts {starts.shape} and ends {ends.shape} must both be [batch] = ({b},)")
  sm_scale = d**-0.5 if sm_scale is None else float(sm_scale)
  if interpret is None:
    interpret = jax.default_backend() == "cpu"
  block_k = block_k or min(DEFAULT_BLOCK_K, max(16, pl.next_power_of_2(s_len)))
  if block_k < 16 or block_k & (block_k - 1):
    raise ValueError(f"block_k={block_k} must be a power of two >= 16")
  group = h // kv_heads
  gp, dp, sp = max(16, pl.next_power_of_2(group)), max(16, pl.next_power_of_2(d)), pl.cdiv(s_len, block_k) * block_k
  qg = pad_axis(pad_axis(q.reshape(b, kv_heads, group, d), 2, gp), 3, dp)
  k_, v_ = (pad_axis(pad_axis(x, 1, sp), 3, dp) for x in (k, v))
  kernel = functools.partial(_decode_kernel, sm_scale=sm_scale, block_k=block_k)
  grid_spec = pl.GridSpec(
      grid=(b, kv_heads),
      in_specs=[pl.BlockSpec((b,), lambda bi, ki: (0,)), pl.BlockSpec((b,), lambda bi, ki: (0,)),
                pl.BlockSpec((None, None, gp, dp), lambda bi, ki: (bi, ki, 0, 0)),
                pl.BlockSpec((None, sp, None, dp), lambda bi, ki: (bi, 0, ki, 0)),
                pl.BlockSpec((None, sp, None, dp), lambda bi, ki: (bi, 0, ki, 0))],
      out_specs=pl.BlockSpec((None, None, gp, dp), lambda bi, ki: (bi, ki, 0, 0)))
  out = pl.pallas_call(kernel, grid_spec=grid_spec, out_shape=jax.ShapeDtypeStruct(qg.shape, q.dtype),
                       interpret=interpret, compiler_params=compiler_params(interpret), name="decode_attention")(
                           starts.astype(jnp.int32), ends.astype(jnp.int32), qg, k_, v_)
  return out[:, :, :group, :d].reshape(b, h, d)
