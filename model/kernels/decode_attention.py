"""Decode attention in Pallas: one new query per sequence against a KV cache with per-sequence valid ranges.

`decode_attention(q, k, v, starts, ends)` takes q [B, H, D] and a cache k, v [B, S, K, D] (K | H, grouped-query) where
row b's valid slots are starts[b] <= slot < ends[b] (left padding before `starts`, empty slots after `ends`). Each
program owns one (row, kv head) pair and all H/K query heads that share it, and walks only the key blocks that overlap
the row's valid range, so a ragged batch costs what its real tokens cost. Online softmax in float32; rows with an empty
range return zeros. Interpret mode on CPU, Triton on GPU (query heads padded to 16 rows for the tensor-core dot).

On TPU (chosen by the platform the program is lowered for) a Mosaic variant runs instead (`tpu_decode_call`, shared
with the paged kernel): grid (row, key block) with the key blocks as the sequential axis, the cache viewed as
[B, S, K * D] so that a block holds every kv head of `block` slots (a legal Mosaic tile for any head_dim), the row's
range scalar-prefetched into SMEM so that blocks outside it repeat the last fetched block index (no DMA) and skip
their compute, and the running softmax kept in VMEM scratch across the key blocks.

`reference_decode_attention` is the plain-jnp definition the kernel is tested against.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

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


def _tpu_decode_kernel(starts_ref, ends_ref, q_ref, k_ref, v_ref, o_ref, acc_ref, m_ref, l_ref, *, kv_heads,
                       head_dim, block, sm_scale):
  """One (row, key block) step: q_ref [K, G, D]; k_ref, v_ref [block, K * D]; scratch acc [K, G, D], m, l [K, G]
  (the online softmax of `common`, carried across key blocks in VMEM)."""
  b, j = pl.program_id(0), pl.program_id(1)
  start, end = starts_ref[b], ends_ref[b]

  @pl.when(j == 0)
  def _init():
    for h in range(kv_heads):
      acc_ref[h], m_ref[h], l_ref[h] = online_softmax_init(*acc_ref.shape[1:])

  first = j * block

  @pl.when((first < end) & (first + block > start))
  def _fold_block():
    slot = first + jax.lax.broadcasted_iota(jnp.int32, (q_ref.shape[1], block), 1)
    valid = (slot >= start) & (slot < end)
    for h in range(kv_heads):  # static: each kv head is a lane slice of the block
      cols = slice(h * head_dim, (h + 1) * head_dim)
      acc_ref[h], m_ref[h], l_ref[h] = online_softmax_step((acc_ref[h], m_ref[h], l_ref[h]), q_ref[h],
                                                           k_ref[:, cols], v_ref[:, cols], valid, sm_scale)

  @pl.when(j == pl.num_programs(1) - 1)
  def _finish():
    for h in range(kv_heads):
      o_ref[h] = online_softmax_finish((acc_ref[h], m_ref[h], l_ref[h])).astype(o_ref.dtype)


def tpu_decode_call(scalars, q, k, v, *, kv_heads, block, num_blocks, kv_block_index, sm_scale):
  """The Mosaic decode kernel over `num_blocks` key blocks per row.

  scalars: (starts [B], ends [B], *extra) int32, prefetched into SMEM; q [B, H, D]; k, v [..., block-able, K * D];
  kv_block_index(b, j, *scalars) -> the k/v block index tuple of row b's j-th key block. Returns [B, H, D]."""
  b, h, d = q.shape
  group = h // kv_heads
  qg = q.reshape(b, kv_heads, group, d)
  head_spec = pl.BlockSpec((None, kv_heads, group, d), lambda bi, j, *_: (bi, 0, 0, 0))
  kv_spec = pl.BlockSpec((None, block, kv_heads * d), kv_block_index)
  extra = len(scalars) - 2
  kernel = functools.partial(_tpu_decode_kernel, kv_heads=kv_heads, head_dim=d, block=block, sm_scale=sm_scale)
  if extra:
    kernel = (lambda inner: lambda *refs: inner(*refs[:2], *refs[2 + extra:]))(kernel)
  out = pl.pallas_call(
      kernel,
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=len(scalars), grid=(b, num_blocks), in_specs=[head_spec, kv_spec, kv_spec],
          out_specs=head_spec,
          scratch_shapes=[pltpu.VMEM((kv_heads, group, d), jnp.float32),
                          pltpu.VMEM((kv_heads, group), jnp.float32),
                          pltpu.VMEM((kv_heads, group), jnp.float32)]),
      compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary")),
      out_shape=jax.ShapeDtypeStruct(qg.shape, q.dtype), name="decode_attention_tpu")(*scalars, qg, k, v)
  return out.reshape(b, h, d)


def last_block(end, block):
  """Index of the block holding slot end - 1 (0 for an empty range), with integer ops Mosaic's scalar core lowers."""
  return jnp.maximum(jax.lax.div(end + block - 1, block) - 1, 0)


def _tpu_decode_attention(q, k, v, starts, ends, *, sm_scale):
  """TPU path of `decode_attention` (arguments checked there): key blocks of up to 128 slots; a length that no
  power-of-two block from 16 divides is padded (a copy of the cache)."""
  b, s_len, kv_heads, d = k.shape
  block = min(DEFAULT_BLOCK_K, max(16, pl.next_power_of_2(s_len)))
  while block > 16 and s_len % block:
    block //= 2
  sp = pl.cdiv(s_len, block) * block
  k_, v_ = (pad_axis(x, 1, sp).reshape(b, sp, kv_heads * d) for x in (k, v))

  def kv_block_index(bi, j, starts_ref, ends_ref):  # blocks outside the range repeat a neighbour: no new DMA
    first = jax.lax.div(starts_ref[bi], block)
    return bi, jnp.minimum(jnp.maximum(j, first), last_block(ends_ref[bi], block)), 0

  return tpu_decode_call((starts.astype(jnp.int32), ends.astype(jnp.int32)), q, k_, v_, kv_heads=kv_heads,
                         block=block, num_blocks=sp // block, kv_block_index=kv_block_index, sm_scale=sm_scale)


def decode_attention(q: jax.Array, k: jax.Array, v: jax.Array, starts: jax.Array, ends: jax.Array, *,
                     sm_scale: float | None = None, block_k: int | None = None,
                     interpret: bool | None = None) -> jax.Array:
  """q [B, H, D]; k, v [B, S, K, D] with K | H; starts, ends [B] int32 (valid slots [start, end)) -> [B, H, D]."""
  if q.ndim != 3 or k.ndim != 4 or k.shape != v.shape:
    raise ValueError(f"decode_attention expects q [B, H, D] and k, v [B, S, K, D]; got {q.shape}, {k.shape}, {v.shape}")
  b, h, d = q.shape
  kv_heads = k.shape[2]
  if k.shape[0] != b or k.shape[3] != d or h % kv_heads:
    raise ValueError(f"cache shape {k.shape} does not match q {q.shape}: need the same batch and head_dim, and kv "
                     "heads dividing query heads")
  if starts.shape != (b,) or ends.shape != (b,):
    raise ValueError(f"starts {starts.shape} and ends {ends.shape} must both be [batch] = ({b},)")
  sm_scale = d**-0.5 if sm_scale is None else float(sm_scale)
  ours = functools.partial(_pallas_decode_attention, sm_scale=sm_scale, block_k=block_k)
  if interpret is not None:
    return ours(q, k, v, starts, ends, interpret=interpret)
  # By the platform the program is lowered for: Mosaic on TPU (also when compiling for a TPU slice from a CPU host),
  # ours in interpret mode on CPU and through Triton on GPUs.
  return jax.lax.platform_dependent(
      q, k, v, starts, ends, tpu=functools.partial(_tpu_decode_attention, sm_scale=sm_scale),
      default=functools.partial(ours, interpret=jax.default_backend() == "cpu"))


def _pallas_decode_attention(q, k, v, starts, ends, *, sm_scale, block_k, interpret):
  """Our Pallas kernel for CPU (interpret) and GPU (Triton); the arguments of `decode_attention`, checked there."""
  b, h, d = q.shape
  s_len, kv_heads = k.shape[1], k.shape[2]
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
