"""Flash attention in Pallas: blockwise online-softmax forward and a recomputing backward (FlashAttention-2 style).

`flash_attention(q, k, v)` takes q [B, L, H, D] and k, v [B, L, K, D] with K dividing H (grouped-query attention),
optional causal masking and segment ids (tokens attend only within their segment), any length (padded internally to
the block size and masked) and any head dim (padded to a power of two >= 16). Logits, the softmax and all accumulators
are float32; inputs may be float32 or bfloat16. No [L, L] matrix is ever materialised: the forward keeps an output
tile and two row statistics per query block, and the backward recomputes probabilities block by block from the saved
log-sum-exp. Gradients for grouped-query kv heads are computed per query head and summed over each group.

The kernels use only portable Pallas (refs, `pl.ds`, `lax.fori_loop`, `lax.dot_general`), so the same code runs in
interpret mode on CPU and lowers through Triton on GPUs. On TPU, `flash_attention` dispatches to the flash attention
kernel that ships with JAX (`jax.experimental.pallas.ops.tpu.flash_attention`), since this kernel's whole-sequence
K/V blocks are not a good fit for TPU VMEM; see `_tpu_flash_attention`.

`reference_attention` is the plain-jnp definition the kernels are tested against.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from model.kernels.common import NEG_INF, compiler_params, dot, pad_axis

DEFAULT_BLOCK = 128  # query and key block on GPU; smaller sequences use one block rounded up to a power of two


def reference_attention(q, k, v, *, causal=True, segment_ids=None, sm_scale=None):
  """Plain-jnp attention with the same contract as `flash_attention`. Returns [B, L, H, D] in q's dtype."""
  b, l, h, d = q.shape
  kv_heads = k.shape[2]
  scale = d**-0.5 if sm_scale is None else sm_scale
  qg = q.reshape(b, l, kv_heads, h // kv_heads, d)
  s = jnp.einsum("bqkgd,bskd->bkgqs", qg, k, preferred_element_type=jnp.float32) * scale
  mask = jnp.ones((b, 1, 1, l, l), bool)
  if causal:
    mask &= jnp.tril(jnp.ones((l, l), bool))
  if segment_ids is not None:
    mask &= (segment_ids[:, :, None] == segment_ids[:, None, :])[:, None, None]
  s = jnp.where(mask, s, NEG_INF)
  p = jnp.where(mask, jnp.exp(s - s.max(-1, keepdims=True)), 0.0)
  p = p / jnp.maximum(p.sum(-1, keepdims=True), 1e-30)
  out = jnp.einsum("bkgqs,bskd->bqkgd", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
  return out.reshape(b, l, h, d).astype(q.dtype)


# -- kernels --------------------------------------------------------------------------------------------------------


def _block_mask(q_start, k_start, block_q, block_k, *, causal, kv_len, padded_len, q_seg, k_seg):
  """[block_q, block_k] bool: key exists, causal order, same segment (each part only when it can be False)."""
  q_idx = q_start + jax.lax.broadcasted_iota(jnp.int32, (block_q, block_k), 0)
  k_idx = k_start + jax.lax.broadcasted_iota(jnp.int32, (block_q, block_k), 1)
  mask = jnp.ones((block_q, block_k), jnp.bool_)
  if kv_len != padded_len:
    mask &= k_idx < kv_len
  if causal:
    mask &= q_idx >= k_idx
  if q_seg is not None:
    mask &= q_seg[:, None] == k_seg[None, :]
  return mask


def _forward_kernel(*refs, sm_scale, causal, block_q, block_k, kv_len, padded_len, has_segments):
  if has_segments:
    q_ref, k_ref, v_ref, qseg_ref, kseg_ref, o_ref, lse_ref = refs
  else:
    (q_ref, k_ref, v_ref, o_ref, lse_ref), qseg_ref, kseg_ref = refs, None, None
  i = pl.program_id(2)
  q = q_ref[...]
  q_seg = qseg_ref[...] if has_segments else None
  head_dim = q.shape[-1]

  def body(j, carry):
    acc, m, l = carry
    k_start = pl.multiple_of(j * block_k, block_k)
    keys = pl.ds(k_start, block_k)
    s = dot(q, k_ref[keys, :], 1, 1) * sm_scale
    mask = _block_mask(i * block_q, k_start, block_q, block_k, causal=causal, kv_len=kv_len, padded_len=padded_len,
                       q_seg=q_seg, k_seg=kseg_ref[keys] if has_segments else None)
    s = jnp.where(mask, s, NEG_INF)
    m_new = jnp.maximum(m, s.max(axis=1))
    p = jnp.where(mask, jnp.exp(s - m_new[:, None]), 0.0)
    alpha = jnp.exp(m - m_new)
    v = v_ref[keys, :]
    acc = acc * alpha[:, None] + dot(p.astype(v.dtype), v, 1, 0)
    return acc, m_new, l * alpha + p.sum(axis=1)

  num_k = pl.cdiv(padded_len, block_k)
  upper = jnp.minimum(pl.cdiv((i + 1) * block_q, block_k), num_k) if causal else num_k
  init = (jnp.zeros((block_q, head_dim), jnp.float32), jnp.full((block_q,), NEG_INF, jnp.float32),
          jnp.zeros((block_q,), jnp.float32))
  acc, m, l = jax.lax.fori_loop(0, upper, body, init)
  l_safe = jnp.where(l == 0.0, 1.0, l)
  o_ref[...] = (acc / l_safe[:, None]).astype(o_ref.dtype)
  lse_ref[...] = m + jnp.log(l_safe)


def _dkv_kernel(*refs, sm_scale, causal, block_q, block_k, kv_len, padded_len, has_segments):
  if has_segments:
    q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, qseg_ref, kseg_ref, dk_ref, dv_ref = refs
  else:
    (q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref), qseg_ref, kseg_ref = refs, None, None
  j = pl.program_id(2)
  k, v = k_ref[...], v_ref[...]
  k_seg = kseg_ref[...] if has_segments else None
  k_start = j * block_k

  def body(i, carry):
    dk, dv = carry
    q_start = pl.multiple_of(i * block_q, block_q)
    rows = pl.ds(q_start, block_q)
    q, do = q_ref[rows, :], do_ref[rows, :]
    s = dot(q, k, 1, 1) * sm_scale
    mask = _block_mask(q_start, k_start, block_q, block_k, causal=causal, kv_len=kv_len, padded_len=padded_len,
                       q_seg=qseg_ref[rows] if has_segments else None, k_seg=k_seg)
    p = jnp.where(mask, jnp.exp(s - lse_ref[rows][:, None]), 0.0)
    dv = dv + dot(p.astype(do.dtype), do, 0, 0)
    dp = dot(do, v, 1, 1)
    ds = p * (dp - delta_ref[rows][:, None]) * sm_scale
    dk = dk + dot(ds.astype(q.dtype), q, 0, 0)
    return dk, dv

  num_q = pl.cdiv(padded_len, block_q)
  lower = (k_start // block_q) if causal else 0
  zeros = jnp.zeros(k.shape, jnp.float32)
  dk, dv = jax.lax.fori_loop(lower, num_q, body, (zeros, zeros))
  dk_ref[...] = dk.astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)


def _dq_kernel(*refs, sm_scale, causal, block_q, block_k, kv_len, padded_len, has_segments):
  if has_segments:
    q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, qseg_ref, kseg_ref, dq_ref = refs
  else:
    (q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref), qseg_ref, kseg_ref = refs, None, None
  i = pl.program_id(2)
  q, do = q_ref[...], do_ref[...]
  lse, delta = lse_ref[...], delta_ref[...]
  q_seg = qseg_ref[...] if has_segments else None

  def body(j, dq):
    k_start = pl.multiple_of(j * block_k, block_k)
    keys = pl.ds(k_start, block_k)
    k, v = k_ref[keys, :], v_ref[keys, :]
    s = dot(q, k, 1, 1) * sm_scale
    mask = _block_mask(i * block_q, k_start, block_q, block_k, causal=causal, kv_len=kv_len, padded_len=padded_len,
                       q_seg=q_seg, k_seg=kseg_ref[keys] if has_segments else None)
    p = jnp.where(mask, jnp.exp(s - lse[:, None]), 0.0)
    ds = p * (dot(do, v, 1, 1) - delta[:, None]) * sm_scale
    return dq + dot(ds.astype(k.dtype), k, 1, 0)

  num_k = pl.cdiv(padded_len, block_k)
  upper = jnp.minimum(pl.cdiv((i + 1) * block_q, block_k), num_k) if causal else num_k
  dq = jax.lax.fori_loop(0, upper, body, jnp.zeros(q.shape, jnp.float32))
  dq_ref[...] = dq.astype(dq_ref.dtype)


# -- pallas_call wrappers -------------------------------------------------------------------------------------------


def _specs(b, lp, h, group, d, block_q, block_k):
  """BlockSpecs over [B, Lp, H|K, D] tensors, [B, H, Lp] row statistics and [B, Lp] segment ids."""
  q_block = pl.BlockSpec((None, block_q, None, d), lambda bi, hi, i: (bi, i, hi, 0))
  kv_full = pl.BlockSpec((None, lp, None, d), lambda bi, hi, i: (bi, 0, hi // group, 0))
  q_full = pl.BlockSpec((None, lp, None, d), lambda bi, hi, i: (bi, 0, hi, 0))
  kv_block = pl.BlockSpec((None, block_k, None, d), lambda bi, hi, j: (bi, j, hi // group, 0))
  kv_block_per_q_head = pl.BlockSpec((None, block_k, None, d), lambda bi, hi, j: (bi, j, hi, 0))
  row_block = pl.BlockSpec((None, None, block_q), lambda bi, hi, i: (bi, hi, i))
  row_full = pl.BlockSpec((None, None, lp), lambda bi, hi, i: (bi, hi, 0))
  seg_q_block = pl.BlockSpec((None, block_q), lambda bi, hi, i: (bi, i))
  seg_full = pl.BlockSpec((None, lp), lambda bi, hi, i: (bi, 0))
  seg_k_block = pl.BlockSpec((None, block_k), lambda bi, hi, j: (bi, j))
  return dict(q_block=q_block, kv_full=kv_full, q_full=q_full, kv_block=kv_block, kv_block_per_q_head=kv_block_per_q_head,
              row_block=row_block, row_full=row_full, seg_q_block=seg_q_block, seg_full=seg_full,
              seg_k_block=seg_k_block)


def _forward(q, k, v, seg, *, causal, sm_scale, block_q, block_k, kv_len, interpret):
  b, lp, h, d = q.shape
  group = h // k.shape[2]
  sp = _specs(b, lp, h, group, d, block_q, block_k)
  in_specs = [sp["q_block"], sp["kv_full"], sp["kv_full"]]
  args = [q, k, v]
  if seg is not None:
    in_specs += [sp["seg_q_block"], sp["seg_full"]]
    args += [seg, seg]
  kernel = functools.partial(_forward_kernel, sm_scale=sm_scale, causal=causal, block_q=block_q, block_k=block_k,
                             kv_len=kv_len, padded_len=lp, has_segments=seg is not None)
  return pl.pallas_call(
      kernel, grid=(b, h, lp // block_q), in_specs=in_specs, out_specs=[sp["q_block"], sp["row_block"]],
      out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((b, h, lp), jnp.float32)],
      interpret=interpret, compiler_params=compiler_params(interpret), name="flash_attention_fwd")(*args)


def _backward(q, k, v, seg, o, lse, do, *, causal, sm_scale, block_q, block_k, kv_len, interpret):
  b, lp, h, d = q.shape
  kv_heads = k.shape[2]
  group = h // kv_heads
  sp = _specs(b, lp, h, group, d, block_q, block_k)
  delta = jnp.einsum("blhd,blhd->bhl", o.astype(jnp.float32), do.astype(jnp.float32))
  common = dict(sm_scale=sm_scale, causal=causal, block_q=block_q, block_k=block_k, kv_len=kv_len, padded_len=lp,
                has_segments=seg is not None)
  seg_args = [seg, seg] if seg is not None else []

  dkv_specs = [sp["q_full"], sp["kv_block"], sp["kv_block"], sp["q_full"], sp["row_full"], sp["row_full"]]
  if seg is not None:
    dkv_specs += [sp["seg_full"], sp["seg_k_block"]]
  per_head = jax.ShapeDtypeStruct((b, lp, h, d), jnp.float32)
  dk, dv = pl.pallas_call(
      functools.partial(_dkv_kernel, **common), grid=(b, h, lp // block_k), in_specs=dkv_specs,
      out_specs=[sp["kv_block_per_q_head"], sp["kv_block_per_q_head"]], out_shape=[per_head, per_head],
      interpret=interpret, compiler_params=compiler_params(interpret), name="flash_attention_dkv",
  )(q, k, v, do, lse, delta, *seg_args)
  dk = dk.reshape(b, lp, kv_heads, group, d).sum(axis=3).astype(k.dtype)
  dv = dv.reshape(b, lp, kv_heads, group, d).sum(axis=3).astype(v.dtype)

  dq_specs = [sp["q_block"], sp["kv_full"], sp["kv_full"], sp["q_block"], sp["row_block"], sp["row_block"]]
  if seg is not None:
    dq_specs += [sp["seg_q_block"], sp["seg_full"]]
  dq = pl.pallas_call(
      functools.partial(_dq_kernel, **common), grid=(b, h, lp // block_q), in_specs=dq_specs,
      out_specs=sp["q_block"], out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype), interpret=interpret,
      compiler_params=compiler_params(interpret), name="flash_attention_dq",
  )(q, k, v, do, lse, delta, *seg_args)
  return dq, dk, dv


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7, 8, 9))
def _flash(q, k, v, seg, causal, sm_scale, block_q, block_k, kv_len, interpret):
  out, _ = _forward(q, k, v, seg, causal=causal, sm_scale=sm_scale, block_q=block_q, block_k=block_k, kv_len=kv_len,
                    interpret=interpret)
  return out


def _flash_fwd(q, k, v, seg, causal, sm_scale, block_q, block_k, kv_len, interpret):
  out, lse = _forward(q, k, v, seg, causal=causal, sm_scale=sm_scale, block_q=block_q, block_k=block_k,
                      kv_len=kv_len, interpret=interpret)
  return out, (q, k, v, seg, out, lse)


def _flash_bwd(causal, sm_scale, block_q, block_k, kv_len, interpret, residuals, do):
  q, k, v, seg, out, lse = residuals
  dq, dk, dv = _backward(q, k, v, seg, out, lse, do, causal=causal, sm_scale=sm_scale, block_q=block_q,
                         block_k=block_k, kv_len=kv_len, interpret=interpret)
  return dq, dk, dv, None


_flash.defvjp(_flash_fwd, _flash_bwd)


# -- public entry point ---------------------------------------------------------------------------------------------


def _default_block(length: int) -> int:
  return min(DEFAULT_BLOCK, max(16, pl.next_power_of_2(length)))


TPU_BLOCK = 128  # the block of JAX's TPU kernel; sequences are padded to a multiple of it


def _tpu_flash_attention(q, k, v, segment_ids, *, causal, sm_scale):
  """TPU path: JAX's bundled Pallas TPU (Mosaic) flash attention, [B, H, L, D] layout, kv heads repeated for GQA.
  The length is padded to a multiple of TPU_BLOCK; padding gets segment 0, which no real token sees."""
  from jax.experimental.pallas.ops.tpu import flash_attention as tpu_fa

  b, l, h, _ = q.shape
  group = h // k.shape[2]
  k, v = jnp.repeat(k, group, axis=2), jnp.repeat(v, group, axis=2)
  lp = TPU_BLOCK * pl.cdiv(l, TPU_BLOCK)
  seg = jnp.ones((b, l), jnp.int32) if segment_ids is None else segment_ids.astype(jnp.int32) + 1
  seg = pad_axis(seg, 1, lp)
  t = lambda x: jnp.swapaxes(pad_axis(x, 1, lp), 1, 2)  # noqa: E731
  out = tpu_fa.flash_attention(t(q), t(k), t(v), segment_ids=tpu_fa.SegmentIds(q=seg, kv=seg), causal=causal,
                               sm_scale=sm_scale)
  return jnp.swapaxes(out, 1, 2)[:, :l]


def flash_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, causal: bool = True,
                    segment_ids: jax.Array | None = None, sm_scale: float | None = None, block_q: int | None = None,
                    block_k: int | None = None, interpret: bool | None = None) -> jax.Array:
  """Memory-efficient exact attention. q [B, L, H, D]; k, v [B, L, K, D] with K | H; segment_ids [B, L] int.

  Returns [B, L, H, D] in q's dtype. `interpret=None` means interpret mode on CPU and compiled elsewhere. Block sizes
  default to 128 (or the sequence rounded up to a power of two when shorter); they must be powers of two >= 16.
  """
  if q.ndim != 4 or k.shape != v.shape or k.ndim != 4:
    raise ValueError(f"flash_attention expects q [B, L, H, D] and k, v [B, L, K, D]; got {q.shape}, {k.shape}, "
                     f"{v.shape}")
  b, l, h, d = q.shape
  if k.shape[0] != b or k.shape[1] != l or k.shape[3] != d or h % k.shape[2]:
    raise ValueError(f"k/v shape {k.shape} does not match q {q.shape}: need the same batch, length and head_dim, "
                     "and kv heads dividing query heads")
  if segment_ids is not None and segment_ids.shape != (b, l):
    raise ValueError(f"segment_ids shape {segment_ids.shape} must be [batch, length] = {(b, l)}")
  sm_scale = d**-0.5 if sm_scale is None else float(sm_scale)
  ours = functools.partial(_pallas_flash_attention, causal=causal, sm_scale=sm_scale, block_q=block_q,
                           block_k=block_k)
  if interpret is not None:
    return ours(q, k, v, segment_ids, interpret=interpret)
  # Chosen by the platform the program is lowered for, not the host's: compiling for a TPU slice from a CPU machine
  # (`scripts.plan --topology`) gets JAX's Mosaic kernel; CPU gets ours in interpret mode, GPUs ours through Triton.
  return jax.lax.platform_dependent(
      q, k, v, segment_ids, tpu=functools.partial(_tpu_flash_attention, causal=causal, sm_scale=sm_scale),
      default=functools.partial(ours, interpret=jax.default_backend() == "cpu"))


def _pallas_flash_attention(q, k, v, segment_ids, *, causal, sm_scale, block_q, block_k, interpret):
  """Our Pallas kernel (the arguments of `flash_attention`, checked there)."""
  b, l, h, d = q.shape
  block_q = block_q or _default_block(l)
  block_k = block_k or _default_block(l)
  for name, blk in (("block_q", block_q), ("block_k", block_k)):
    if blk < 16 or blk & (blk - 1):
      raise ValueError(f"{name}={blk} must be a power of two >= 16")
  lp = math.lcm(block_q, block_k) * pl.cdiv(l, math.lcm(block_q, block_k))
  dp = max(16, pl.next_power_of_2(d))
  q_, k_, v_ = (pad_axis(pad_axis(x, 1, lp), 3, dp) for x in (q, k, v))
  seg = None if segment_ids is None else pad_axis(segment_ids.astype(jnp.int32), 1, lp)
  out = _flash(q_, k_, v_, seg, bool(causal), sm_scale, int(block_q), int(block_k), int(l), bool(interpret))
  return out[:, :l, :, :d]
