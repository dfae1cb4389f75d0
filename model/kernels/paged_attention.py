"""Paged decode attention in Pallas (vLLM's PagedAttention): one new query per sequence against KV pages.

The cache is a pool of fixed-size pages, k_pages / v_pages [num_pages, page_size, K, D]. Sequence b owns the pages
listed in page_table[b] ([max_pages] int32, in order) and its first lengths[b] slots are live: slot s lives in page
page_table[b, s // page_size] at offset s % page_size. `paged_decode_attention(q, k_pages, v_pages, page_table,
lengths)` takes q [B, H, D] (K | H, grouped-query) and returns [B, H, D]. Each program owns one (sequence, kv head)
pair and the H/K query heads that share it, and visits only the sequence's live pages, one page per step, with an
online softmax in float32. A sequence of length 0 returns zeros. Interpret mode on CPU, Triton on GPU; on TPU the
Mosaic decode kernel of `decode_attention` runs over the pool viewed as [N, P, K * D], one page (every kv head) per
block, the block index read from the scalar-prefetched page table (pages past a sequence's length repeat its last
page: no DMA, no compute).

`reference_paged_decode_attention` gathers the pages into a contiguous cache and runs the plain-jnp decode
reference; it is what the kernel is tested against and what `attention_impl=xla` serves with.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from model.kernels.common import (compiler_params, online_softmax_finish, online_softmax_init, online_softmax_step,
                                  pad_axis)
from model.kernels.decode_attention import last_block, reference_decode_attention, tpu_decode_call


def gather_pages(pages: jax.Array, page_table: jax.Array) -> jax.Array:
  """pages [N, P, K, D], page_table [B, M] -> each sequence's slots in order, [B, M * P, K, D]."""
  b, m = page_table.shape
  return pages[page_table].reshape(b, m * pages.shape[1], *pages.shape[2:])


def reference_paged_decode_attention(q, k_pages, v_pages, page_table, lengths, *, sm_scale=None):
  """Plain-jnp paged decode attention (gather, then contiguous decode). Returns [B, H, D] in q's dtype."""
  k, v = gather_pages(k_pages, page_table), gather_pages(v_pages, page_table)
  return reference_decode_attention(q, k, v, jnp.zeros_like(lengths), lengths, sm_scale=sm_scale)


def _paged_kernel(table_ref, lengths_ref, q_ref, k_ref, v_ref, o_ref, *, sm_scale, page_size, max_pages):
  b = pl.program_id(0)
  length = lengths_ref[b]
  q = q_ref[...]  # [G, D]

  def body(j, carry):
    page = table_ref[b * max_pages + j]
    rows = pl.ds(pl.multiple_of(page * page_size, page_size), page_size)
    slot = j * page_size + jax.lax.broadcasted_iota(jnp.int32, (q.shape[0], page_size), 1)
    return online_softmax_step(carry, q, k_ref[rows, :], v_ref[rows, :], slot < length, sm_scale)

  carry = jax.lax.fori_loop(0, pl.cdiv(length, page_size), body, online_softmax_init(*q.shape))
  o_ref[...] = online_softmax_finish(carry).astype(o_ref.dtype)


def paged_decode_attention(q: jax.Array, k_pages: jax.Array, v_pages: jax.Array, page_table: jax.Array,
                           lengths: jax.Array, *, sm_scale: float | None = None,
                           interpret: bool | None = None) -> jax.Array:
  """q [B, H, D]; k/v pages [N, P, K, D] (P a power of two >= 16, K | H); page_table [B, M]; lengths [B] -> [B, H, D].

  lengths[b] <= M * P; entries of page_table beyond a sequence's live pages are never read."""
  if q.ndim != 3 or k_pages.ndim != 4 or k_pages.shape != v_pages.shape:
    raise ValueError(f"paged_decode_attention expects q [B, H, D] and pages [N, P, K, D]; got {q.shape}, "
                     f"{k_pages.shape}, {v_pages.shape}")
  b, h, d = q.shape
  num_pages, page_size, kv_heads, _ = k_pages.shape
  if k_pages.shape[3] != d or h % kv_heads:
    raise ValueError(f"pages {k_pages.shape} do not match q {q.shape}: need the same head_dim and kv heads dividing "
                     "query heads")
  if page_size < 16 or page_size & (page_size - 1):
    raise ValueError(f"page_size={page_size} must be a power of two >= 16 (it is the kernel's key block)")
  if page_table.ndim != 2 or page_table.shape[0] != b or lengths.shape != (b,):
    raise ValueError(f"page_table {page_table.shape} must be [B={b}, max_pages] and lengths {lengths.shape} [B]")
  sm_scale = d**-0.5 if sm_scale is None else float(sm_scale)
  ours = functools.partial(_pallas_paged_decode_attention, sm_scale=sm_scale)
  if interpret is not None:
    return ours(q, k_pages, v_pages, page_table, lengths, interpret=interpret)
  # By the platform the program is lowered for (as `decode_attention`): Mosaic on TPU, ours elsewhere.
  return jax.lax.platform_dependent(
      q, k_pages, v_pages, page_table, lengths, tpu=functools.partial(_tpu_paged_decode_attention, sm_scale=sm_scale),
      default=functools.partial(ours, interpret=jax.default_backend() == "cpu"))


def _tpu_paged_decode_attention(q, k_pages, v_pages, page_table, lengths, *, sm_scale):
  """TPU path (arguments checked by `paged_decode_attention`): the pool as [N, P, K * D] (a free reshape)."""
  num_pages, page_size, kv_heads, d = k_pages.shape
  max_pages = page_table.shape[1]
  k_, v_ = (x.reshape(num_pages, page_size, kv_heads * d) for x in (k_pages, v_pages))
  lengths = lengths.astype(jnp.int32)

  def kv_block_index(bi, j, starts_ref, ends_ref, table_ref):
    live = jnp.minimum(j, last_block(ends_ref[bi], page_size))
    return jnp.minimum(jnp.maximum(table_ref[bi * max_pages + live], 0), num_pages - 1), 0, 0  # never out of bounds

  scalars = (jnp.zeros_like(lengths), lengths, page_table.astype(jnp.int32).reshape(-1))
  return tpu_decode_call(scalars, q, k_, v_, kv_heads=kv_heads, block=page_size, num_blocks=max_pages,
                         kv_block_index=kv_block_index, sm_scale=sm_scale)


def _pallas_paged_decode_attention(q, k_pages, v_pages, page_table, lengths, *, sm_scale, interpret):
  """Our Pallas kernel for CPU (interpret) and GPU (Triton); the arguments of `paged_decode_attention`."""
  b, h, d = q.shape
  num_pages, page_size, kv_heads, _ = k_pages.shape
  group, max_pages = h // kv_heads, page_table.shape[1]
  gp, dp = max(16, pl.next_power_of_2(group)), max(16, pl.next_power_of_2(d))
  qg = pad_axis(pad_axis(q.reshape(b, kv_heads, group, d), 2, gp), 3, dp)
  k_, v_ = (pad_axis(x, 3, dp).reshape(num_pages * page_size, kv_heads, dp) for x in (k_pages, v_pages))
  flat = lambda n: pl.BlockSpec((n,), lambda bi, ki: (0,))  # noqa: E731
  pool = pl.BlockSpec((num_pages * page_size, None, dp), lambda bi, ki: (0, ki, 0))
  head_block = pl.BlockSpec((None, None, gp, dp), lambda bi, ki: (bi, ki, 0, 0))
  kernel = functools.partial(_paged_kernel, sm_scale=sm_scale, page_size=page_size, max_pages=max_pages)
  out = pl.pallas_call(
      kernel, grid=(b, kv_heads), in_specs=[flat(b * max_pages), flat(b), head_block, pool, pool],
      out_specs=head_block, out_shape=jax.ShapeDtypeStruct(qg.shape, q.dtype), interpret=interpret,
      compiler_params=compiler_params(interpret), name="paged_decode_attention")(
          page_table.astype(jnp.int32).reshape(-1), lengths.astype(jnp.int32), qg, k_, v_)
  return out[:, :, :group, :d].reshape(b, h, d)
