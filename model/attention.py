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
from typing import NamedTuple

import jax
import jax.numpy as jnp

from configs import base
from model.kernels import decode_attention as decode
from model.kernels import flash_attention as flash
from model.kernels import paged_attention as paged
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


def write_pages(pages: jax.Array, new: jax.Array, visibility: PagedVisibility) -> jax.Array:
  """Scatters this step's keys or values into their pages. pages [N, P, K, D], new [B, L, K, D] -> pages."""
  page_size = pages.shape[1]
  slots = visibility.q_slots
  page = jnp.take_along_axis(visibility.page_table, slots // page_size, axis=1, mode="clip")
  page = jnp.where(visibility.q_segment_ids > 0, page, 0)
  return pages.at[page, slots % page_size].set(new.astype(pages.dtype))


def attend_paged(q: jax.Array, k_pages: jax.Array, v_pages: jax.Array, visibility: PagedVisibility, *,
                 impl: str = "xla", sm_scale: float | None = None) -> jax.Array:
  """q [B, L, H, D] against paged k/v [N, P, K, D] -> [B, L, H, D]. `pallas` runs the paged decode kernel for
  one-token steps; everything else gathers each row's pages and runs the `xla` reference."""
  scale = sm_scale if sm_scale is not None else q.shape[-1] ** -0.5
  live = visibility.q_segment_ids
  if impl == "pallas" and q.shape[1] == 1:
    lengths = jnp.where(live[:, 0] > 0, visibility.lengths, 0)
    return paged.paged_decode_attention(q[:, 0], k_pages, v_pages, visibility.page_table, lengths,
                                        sm_scale=scale)[:, None]
  k = paged.gather_pages(k_pages, visibility.page_table).astype(q.dtype)
  v = paged.gather_pages(v_pages, visibility.page_table).astype(q.dtype)
  kv_live = (jnp.arange(k.shape[1], dtype=jnp.int32)[None, :] < visibility.lengths[:, None]).astype(jnp.int32)
  return xla_attention(q, k, v, Visibility(live, kv_live, visibility.q_slots), scale)


class HeadsMajorKV(NamedTuple):
  """A dense KV cache laid out heads-major, k/v [B, K, S, D]: the layout the attention dots batch over, so a decode
  step reads the cache as it is instead of transposing all of it (`Transformer.init_cache(per_layer=True)`)."""
  k: jax.Array
  v: jax.Array


def xla_attention(q: jax.Array, k: jax.Array, v: jax.Array, visibility: Visibility, sm_scale: float,
                  heads_major: bool = False) -> jax.Array:
  """Reference grouped-query attention. q [B, Lq, H, D], k/v [B, Lk, K, D] (or [B, K, Lk, D] with `heads_major`)
  with K | H -> [B, Lq, H, D] (q's dtype).

  Logits and softmax in float32; rows with no visible key give the mean of v (finite, never NaN).
  """
  b, lq, h, d = q.shape
  kv_heads = k.shape[1 if heads_major else 2]
  kv = "bksd" if heads_major else "bskd"
  mask = visibility.mask()
  q = q.reshape(b, lq, kv_heads, h // kv_heads, d)
  logits = jnp.einsum(f"bqkgd,{kv}->bkgqs", q, k, preferred_element_type=jnp.float32) * sm_scale
  logits = jnp.where(mask[:, :, None], logits, NEG_INF)
  probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  out = jnp.einsum(f"bkgqs,{kv}->bqkgd", probs, v, preferred_element_type=jnp.float32)
  return out.reshape(b, lq, h, d).astype(q.dtype)


def pallas_attention(q, k, v, visibility: Visibility, sm_scale: float) -> jax.Array:
  return flash.flash_attention(q, k, v, causal=True, segment_ids=visibility.q_segment_ids, sm_scale=sm_scale)


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


IMPLS = {"xla": xla_attention, "pallas": pallas_attention, "cudnn": cudnn_attention}
base.check_implemented("model.attention_impl", base.ATTENTION_IMPLS, IMPLS)


def attend(q, k, v, visibility: Visibility, *, impl: str = "xla", sm_scale: float | None = None,
           heads_major: bool = False) -> jax.Array:
  """Dispatches to the configured implementation (kernels only for full causal self-attention; else `xla`).
  `heads_major`: k/v are [B, K, S, D] (a `HeadsMajorKV` cache), which only `xla` reads."""
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
  return IMPLS[impl](q, k, v, visibility, scale)
