"""Attention math and its implementation switch (`model.attention_impl`).

The model describes visibility with `Visibility` (segment ids and slots) instead of a materialised mask, so each
implementation can use what suits it:
  * `xla`: the plain-jnp reference; builds a [B, 1, Lq, Lk] mask. Serves every case, KV-cache decoding included.
  * `pallas`: our flash attention kernel (`model/kernels/flash_attention.py`) for causal self-attention over a full
    sequence (training, scoring), and our decode kernel (`model/kernels/decode_attention.py`) for one-token cache
    steps; multi-token cache steps (prefill into a cache) use `xla`.
  * `cudnn`: `jax.nn.dot_product_attention(implementation="cudnn")` on NVIDIA GPUs, same coverage as `pallas`.
Segment 0 marks padding. Padding queries see nothing under `xla` and other padding under the kernels; their outputs
are never used (their loss weight is 0), and every real token gets identical attention from all three.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from configs import base
from model.kernels import cpu_native
from model.kernels import decode_attention as decode
from model.kernels import flash_attention as flash
from model.kernels import paged_attention as paged
from model import sharding
from model.kernels.common import NEG_INF


@functools.partial(jax.tree_util.register_dataclass, data_fields=["q_segment_ids", "kv_segment_ids", "q_slots"],
                   meta_fields=["self_attention"])
@dataclasses.dataclass(frozen=True)
class Visibility:
  """Who sees whom. q_segment_ids [B, Lq], kv_segment_ids [B, Lk] int32 (0 = padding/empty); q_slots [B, Lq] int32:
  the kv slot of each query (causal: slot j is visible from slot s when j <= s). `self_attention` is True when
  queries and keys are the same full sequence (q_slots = 0..L-1, same segments), which the kernels require."""

  q_segment_ids: jax.Array
  kv_segment_ids: jax.Array
  q_slots: jax.Array
  self_attention: bool = False

  @classmethod
  def causal_self(cls, segment_ids: jax.Array) -> "Visibility":
    b, l = segment_ids.shape
    slots = jnp.broadcast_to(jnp.arange(l, dtype=jnp.int32), (b, l))
    return cls(segment_ids, segment_ids, slots, self_attention=True)

  def mask(self) -> jax.Array:
    """Boolean [B, 1, Lq, Lk]: causal in slot order, same non-zero segment."""
    kv_slots = jnp.arange(self.kv_segment_ids.shape[1], dtype=jnp.int32)
    causal = kv_slots[None, None, :] <= self.q_slots[:, :, None]
    kv = self.kv_segment_ids[:, None, :]
    same = (self.q_segment_ids[:, :, None] == kv) & (kv != 0)
    return (causal & same)[:, None]


@dataclasses.dataclass(frozen=True)
class PagedVisibility:
  """Who sees whom in a paged KV cache (`infer/engine.py`), one sequence per row, slot = position in the sequence.

  q_segment_ids [B, L] int32: 1 for a real token, 0 for padding (not written; sees nothing). q_slots [B, L] int32:
  the slot each token is written to. page_table [B, M] int32: each row's pages in order (page 0 is the engine's
  scratch page, where padding writes land). lengths [B] int32: each row's live slots once this step is written."""

  q_segment_ids: jax.Array
  q_slots: jax.Array
  page_table: jax.Array
  lengths: jax.Array


@dataclasses.dataclass(frozen=True)
class PagedGroups:
  """Several `PagedVisibility` groups of different shapes in one step (mixed batches: prefill chunks [P, Lp] beside
  decode tokens [S, 1]). The step's tokens are laid out flat, [1, T] with T = sum of B_g * L_g, group after group
  and row-major within a group; every layer's projections and MLP run over all T tokens at once (one pass over the
  weights) and only attention works per group."""

  groups: tuple[PagedVisibility, ...]

  @property
  def q_segment_ids(self) -> jax.Array:
    """[1, T] int32: 1 for a real token (what MoE routing masks with)."""
    return jnp.concatenate([g.q_segment_ids.reshape(-1) for g in self.groups])[None]


def paged_step(q: jax.Array, k: jax.Array, v: jax.Array, kv_pages: tuple[jax.Array, jax.Array],
               visibility: PagedVisibility | PagedGroups, impl: str,
               matmul_impl: str = "xla") -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
  """Writes this step's keys and values into their pages and attends over the pages. q [B, L, H, D], k/v [B, L, K, D]
  (for `PagedGroups`: [1, T, ...], split per group); kv_pages (k, v) [N, P, K, D]. Returns (out like q, kv_pages).
  `matmul_impl` as in `attend_paged`."""
  if isinstance(visibility, PagedVisibility):
    kv_pages = tuple(write_pages(pages, new, visibility) for pages, new in zip(kv_pages, (k, v)))
    return attend_paged(q, *kv_pages, visibility, impl=impl, matmul_impl=matmul_impl), kv_pages
  ends = list(itertools.accumulate(g.q_segment_ids.size for g in visibility.groups))
  split = lambda t: [part.reshape(*g.q_segment_ids.shape, *t.shape[2:])  # noqa: E731
                     for part, g in zip(jnp.split(t, ends[:-1], axis=1), visibility.groups)]
  # one scatter for all groups (they write apart), before any read
  where = [_page_slots(g, kv_pages[0].shape[1]) for g in visibility.groups]
  page, slot = (jnp.concatenate([w[i].reshape(-1) for w in where]) for i in (0, 1))
  kv_pages = tuple(pages.at[page, slot].set(new[0].astype(pages.dtype)) for pages, new in zip(kv_pages, (k, v)))
  outs = [attend_paged(q_g, *kv_pages, g, impl=impl, matmul_impl=matmul_impl)
          for g, q_g in zip(visibility.groups, split(q))]
  return jnp.concatenate([o.reshape(1, -1, *o.shape[2:]) for o in outs], axis=1), kv_pages


def _page_slots(visibility: PagedVisibility, page_size: int) -> tuple[jax.Array, jax.Array]:
  """Where each token of a step is written: (page [B, L], offset in the page [B, L]); padding goes to page 0."""
  slots = visibility.q_slots
  page = jnp.take_along_axis(visibility.page_table, slots // page_size, axis=1, mode="clip")
  return jnp.where(visibility.q_segment_ids > 0, page, 0), slots % page_size


def write_pages(pages: jax.Array, new: jax.Array, visibility: PagedVisibility) -> jax.Array:
  """Scatters this step's keys or values into their pages. pages [N, P, K, D], new [B, L, K, D] -> pages."""
  page, slot = _page_slots(visibility, pages.shape[1])
  return pages.at[page, slot].set(new.astype(pages.dtype))


def attend_paged(q: jax.Array, k_pages: jax.Array, v_pages: jax.Array, visibility: PagedVisibility, *,
                 impl: str = "xla", sm_scale: float | None = None, matmul_impl: str = "xla") -> jax.Array:
  """q [B, L, H, D] against paged k/v [N, P, K, D] -> [B, L, H, D]. `pallas` runs the paged decode kernel for
  one-token steps; so does `xla` with `matmul_impl` auto or native, through the native CPU kernel where it is built
  (float32 pages, one device: `cpu_native.paged_decode_attention`, which reads live pages in place); everything else
  gathers each row's pages and runs the `xla` reference."""
  scale = sm_scale if sm_scale is not None else q.shape[-1] ** -0.5
  live = visibility.q_segment_ids
  if q.shape[1] == 1 and (impl == "pallas" or (impl == "xla" and k_pages.dtype == jnp.float32
                                               and _native_batched(matmul_impl))):
    lengths = jnp.where(live[:, 0] > 0, visibility.lengths, 0)
    kernel = paged.paged_decode_attention if impl == "pallas" else cpu_native.paged_decode_attention
    return kernel(q[:, 0], k_pages, v_pages, visibility.page_table, lengths, sm_scale=scale)[:, None].astype(q.dtype)
  k = paged.gather_pages(k_pages, visibility.page_table).astype(q.dtype)
  v = paged.gather_pages(v_pages, visibility.page_table).astype(q.dtype)
  kv_live = (jnp.arange(k.shape[1], dtype=jnp.int32)[None, :] < visibility.lengths[:, None]).astype(jnp.int32)
  return xla_attention(q, k, v, Visibility(live, kv_live, visibility.q_slots), scale)


class HeadsMajorKV(NamedTuple):
  """A dense KV cache laid out heads-major, k/v [B * K, S, D]: the layout the attention dots batch over, so a decode
  step reads the cache as it is instead of transposing or copying all of it
  (`Transformer.init_cache(per_layer=True)`)."""
  k: jax.Array
  v: jax.Array


def xla_attention(q: jax.Array, k: jax.Array, v: jax.Array, visibility: Visibility, sm_scale: float,
                  heads_major: bool = False) -> jax.Array:
  """Reference grouped-query attention. q [B, Lq, H, D], k/v [B, Lk, K, D] (or [B * K, Lk, D] with `heads_major`)
  with K | H -> [B, Lq, H, D] (q's dtype).

  Logits and softmax in float32; rows with no visible key give the mean of v (finite, never NaN).
  """
  b, lq, h, d = q.shape
  mask = visibility.mask()
  if heads_major:
    return _heads_major_attention(q, k, v, mask, sm_scale)
  kv_heads = k.shape[2]
  kv = "bskd"
  q = q.reshape(b, lq, kv_heads, h // kv_heads, d)
  logits = jnp.einsum(f"bqkgd,{kv}->bkgqs", q, k, preferred_element_type=jnp.float32) * sm_scale
  logits = jnp.where(mask[:, :, None], logits, NEG_INF)
  probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  out = jnp.einsum(f"bkgqs,{kv}->bqkgd", probs, v, preferred_element_type=jnp.float32)
  return out.reshape(b, lq, h, d).astype(q.dtype)


def _heads_major_attention(q, k, v, mask, sm_scale: float) -> jax.Array:
  """q [B, Lq, H, D] against a `HeadsMajorKV` cache k/v [B * K, S, D] with mask [B, 1, Lq, S] -> [B, Lq, H, D]. Both
  dots have one batch dimension and read the cache as it is stored: a cache reshaped on its way to the dot made XLA
  fuse the cache update into each reader and copy the whole cache several times per decode step."""
  b, lq, h, d = q.shape
  kv_heads = k.shape[0] // b
  g = h // kv_heads
  qh = q.reshape(b, lq, kv_heads, g, d).transpose(0, 2, 3, 1, 4).reshape(b * kv_heads, g * lq, d)
  logits = jnp.einsum("nqd,nsd->nqs", qh, k, preferred_element_type=jnp.float32) * sm_scale
  visible = jnp.broadcast_to(mask[:, :, None], (b, kv_heads, g, lq, mask.shape[-1])).reshape(logits.shape)
  probs = jax.nn.softmax(jnp.where(visible, logits, NEG_INF), axis=-1).astype(v.dtype)
  out = jnp.einsum("nqs,nsd->nqd", probs, v, preferred_element_type=jnp.float32)
  return out.reshape(b, kv_heads, g, lq, d).transpose(0, 3, 1, 2, 4).reshape(b, lq, h, d).astype(q.dtype)


def xla_self_attention(q: jax.Array, k: jax.Array, v: jax.Array, visibility: Visibility, sm_scale: float,
                       native: bool = False) -> jax.Array:
  """`xla_attention` with a hand-written backward pass, for training. q [B, L, H, D], k/v [B, L, K, D] -> [B, L, H, D].

  Same forward math, laid out heads-major ([B, K, G*L, D], batch dimensions leading, so every dot is a plain batched
  matmul). The backward pass reuses the saved probabilities and the FlashAttention identity
  dS = P * (dP - rowsum(dO * O)) instead of differentiating the softmax, so the [B, H, L, L] work is two
  elementwise passes instead of autodiff's chain. `native`: the six batched matmuls run on the native CPU kernel
  (`cpu_native.batched_matmul`, float32, L and D multiples of 32), which splits them over the thread pool where XLA
  runs each on one thread (docs/performance.md has both measured effects)."""
  b, l, h, d = q.shape
  kv_heads = k.shape[2]
  native = native and q.dtype == jnp.float32 and cpu_native.supports_batched(l) and cpu_native.supports_batched(d)
  heads_major = lambda x: x.transpose(0, 2, 1, 3)  # noqa: E731  [B, L, K, D] -> [B, K, L, D]
  qt = q.reshape(b, l, kv_heads, h // kv_heads, d).transpose(0, 2, 3, 1, 4).reshape(b, kv_heads, -1, d)
  out = _self_attention(qt, heads_major(k), heads_major(v), visibility.mask()[:, :, None], sm_scale, native)
  return out.reshape(b, kv_heads, h // kv_heads, l, d).transpose(0, 3, 1, 2, 4).reshape(b, l, h, d)


def _bmm(a: jax.Array, b: jax.Array, transpose_a: bool, transpose_b: bool, native: bool) -> jax.Array:
  """Batched a @ b over the leading dimensions ([..., m, k] @ [..., k, n], either transposed) -> float32 [..., m, n]."""
  if native:
    lead = a.shape[:-2]
    out = cpu_native.batched_matmul(a.reshape(-1, *a.shape[-2:]), b.reshape(-1, *b.shape[-2:]), transpose_a,
                                    transpose_b)
    return out.reshape(*lead, *out.shape[-2:])
  return jnp.einsum(f"...{'km' if transpose_a else 'mk'},...{'nk' if transpose_b else 'kn'}->...mn", a, b,
                    preferred_element_type=jnp.float32)


def _probs(qt, kt, mask, sm_scale, native):
  """Softmax probabilities, float32 [B, K, G*L, S], of heads-major q [B, K, G*L, D] against k [B, K, S, D] under
  mask [B, 1, 1, L, S]; rows that see nothing get uniform probabilities (so a finite mean of v)."""
  b, kv_heads, gl, _ = qt.shape
  s = kt.shape[2]
  logits = _bmm(qt, kt, False, True, native) * sm_scale
  logits = jnp.where(mask, logits.reshape(b, kv_heads, -1, mask.shape[-2], s), NEG_INF).reshape(b, kv_heads, gl, s)
  return jax.nn.softmax(logits, axis=-1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _self_attention(qt, kt, vt, mask, sm_scale, native):
  return _self_attention_fwd(qt, kt, vt, mask, sm_scale, native)[0]


def _self_attention_fwd(qt, kt, vt, mask, sm_scale, native):
  probs = _probs(qt, kt, mask, sm_scale, native)
  out = _bmm(probs.astype(vt.dtype), vt, False, False, native)
  return out.astype(qt.dtype), (qt, kt, vt, mask, probs, out)


def _self_attention_bwd(sm_scale, native, residuals, d_out):
  qt, kt, vt, mask, probs, out = residuals
  b, kv_heads, gl, s = probs.shape
  delta = jnp.sum(d_out.astype(jnp.float32) * out, axis=-1, keepdims=True)  # rowsum(dO * O) = rowsum(P * dP)
  d_v = _bmm(probs.astype(vt.dtype), d_out, True, False, native)
  d_logits = probs * (_bmm(d_out, vt, False, True, native) - delta)
  visible = mask.reshape(mask.shape[0], 1, 1, mask.shape[-2], s)
  d_logits = jnp.where(visible, d_logits.reshape(b, kv_heads, -1, mask.shape[-2], s), 0.0).reshape(b, kv_heads, gl, s)
  d_logits = (d_logits * sm_scale).astype(qt.dtype)
  d_q = _bmm(d_logits, kt, False, False, native)
  d_k = _bmm(d_logits, qt, True, False, native)
  return d_q.astype(qt.dtype), d_k.astype(kt.dtype), d_v.astype(vt.dtype), None


_self_attention.defvjp(_self_attention_fwd, _self_attention_bwd)


def pallas_attention(q, k, v, visibility: Visibility, sm_scale: float) -> jax.Array:
  kernel = functools.partial(flash.flash_attention, causal=True, sm_scale=sm_scale)
  return per_shard(lambda q, k, v, seg: kernel(q, k, v, segment_ids=seg), q, k, v, visibility.q_segment_ids)


def per_shard(fn, q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array):
  """fn(q, k, v, segment_ids) on each device's shard when a mesh is active (`jax.shard_map`): XLA cannot partition a
  kernel's custom call (Mosaic on TPU, Triton on GPU) itself. Rows split as the batch is, heads over `tensor` when
  both head counts divide by it; attention needs nothing from other shards. q [B, L, H, D], k/v [B, L, K, D],
  segment_ids [B, L]; returns fn's [B, L, H, D]."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh is None or mesh.empty:
    return fn(q, k, v, segment_ids)
  sizes = dict(zip(mesh.axis_names, mesh.axis_sizes))
  heads = sizes.get("tensor", 1)
  split_heads = q.shape[2] % heads == 0 and k.shape[2] % heads == 0
  spec = lambda *names: sharding.logical_to_spec(names, mesh.axis_names)  # noqa: E731
  q_spec = spec("batch", "length", "heads" if split_heads else None, "head_dim")
  batch_axes = q_spec[0] if isinstance(q_spec[0], tuple) else (q_spec[0],) if q_spec[0] else ()
  if q.shape[0] % math.prod(sizes[a] for a in batch_axes):  # a batch the mesh cannot split: rows stay whole
    q_spec = jax.sharding.PartitionSpec(None, *q_spec[1:])
  kv_spec = jax.sharding.PartitionSpec(q_spec[0], None, q_spec[2], None)
  manual = set(mesh.axis_names) - set(getattr(mesh, "manual_axes", ()))  # all axes not manual already (pipeline)
  return jax.shard_map(fn, in_specs=(q_spec, kv_spec, kv_spec, jax.sharding.PartitionSpec(q_spec[0], None)),
                       out_specs=q_spec, axis_names=manual, check_vma=False)(q, k, v, segment_ids)


def pallas_decode_attention(q, k, v, visibility: Visibility, sm_scale: float) -> jax.Array:
  """One query per row against a cache whose live slots are contiguous (left padding, then the sequence) up to the
  query's own slot, the layout `Transformer.extend` writes. q [B, 1, H, D] -> [B, 1, H, D]."""
  live = visibility.kv_segment_ids != 0
  starts = jnp.argmax(live, axis=1).astype(jnp.int32)
  ends = jnp.where(visibility.q_segment_ids[:, 0] != 0, visibility.q_slots[:, 0] + 1, starts)
  return decode.decode_attention(q[:, 0], k, v, starts, ends, sm_scale=sm_scale)[:, None]


def cudnn_attention(q, k, v, visibility: Visibility, sm_scale: float) -> jax.Array:
  if jax.default_backend() != "gpu":
    raise ValueError(f"attention_impl='cudnn' needs an NVIDIA GPU; this backend is {jax.default_backend()!r} "
                     "(use 'xla' or 'pallas')")
  seg = visibility.q_segment_ids
  mask = (seg[:, :, None] == seg[:, None, :])[:, None]
  return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=sm_scale, is_causal=True, implementation="cudnn")


def _native_batched(matmul_impl: str) -> bool:
  if matmul_impl == "native":
    cpu_native.require()
  elif matmul_impl != "auto":
    return False
  mesh = jax.sharding.get_abstract_mesh()
  return cpu_native.available() and (mesh.empty or mesh.size == 1)


IMPLS = {"xla": xla_attention, "pallas": pallas_attention, "cudnn": cudnn_attention}
base.check_implemented("model.attention_impl", base.ATTENTION_IMPLS, IMPLS)


def attend(q, k, v, visibility: Visibility, *, impl: str = "xla", sm_scale: float | None = None,
           heads_major: bool = False, matmul_impl: str = "xla") -> jax.Array:
  """Dispatches to the configured implementation (kernels only for full causal self-attention; else `xla`).
  `heads_major`: k/v are [B * K, S, D] (a `HeadsMajorKV` cache), which only `xla` reads. `matmul_impl`
  (`model.matmul_impl`): with auto or native, `xla` self-attention runs its batched matmuls on the native CPU kernel
  where it is built and the program is not partitioned over several devices (the kernel does not shard)."""
  if impl not in IMPLS:
    raise ValueError(f"attention_impl={impl!r} is not available; choose one of {sorted(IMPLS)}")
  scale = sm_scale if sm_scale is not None else q.shape[-1] ** -0.5
  if heads_major:
    if impl != "xla":
      raise ValueError(f"a heads-major KV cache is read by attention_impl='xla' only, not {impl!r}")
    return xla_attention(q, k, v, visibility, scale, heads_major=True)
  if impl == "pallas" and not visibility.self_attention and q.shape[1] == 1:
    return pallas_decode_attention(q, k, v, visibility, scale)
  if impl != "xla" and not visibility.self_attention:
    impl = "xla"
  if impl == "xla" and visibility.self_attention:
    return xla_self_attention(q, k, v, visibility, scale, native=_native_batched(matmul_impl))
  return IMPLS[impl](q, k, v, visibility, scale)
