"""int8 matmuls in Pallas: W8A16 (weights int8, dequantised in the kernel) and W8A8 (int8 x int8, int32 accumulation).

* `w8a16_matmul(x, w_q, w_scale)`: x [M, K] float (bf16/f32), w_q [K, N] int8, w_scale [N] (per output channel) or
  [K // group, N] (per group of `group` input rows) float32 -> [M, N] in x's dtype. Per-channel scales are applied
  once to the float32 accumulator; per-group scales to each group's partial product.
* `w8a8_matmul(x_q, x_scale, w_q, w_scale)`: x_q [M, K] int8 with per-token scales x_scale [M], w_q [K, N] int8 with
  per-channel scales w_scale [N] -> float32 [M, N] = (x_q @ w_q in int32) * x_scale[:, None] * w_scale[None, :].

Shapes are padded to the blocks with zeros (exact). Interpret mode on CPU, Triton on GPU. On TPU (chosen by the
platform the program is lowered for) Mosaic variants run instead: a (M, N, K) grid with K the sequential axis and a
VMEM accumulator (float32 for W8A16, int32 on the MXU's int8 path for W8A8), blocks on the (8, 128) tile grid (int8
rows in 32s), the int8 weights widened to x's dtype inside the kernel so HBM moves one byte per weight; group scales
stay whole in VMEM and each group's partial product is scaled as it is added. `transposed=True` takes the weight as
[N, K] (a tied embedding used as the head): the TPU variants contract it in place, elsewhere it is transposed first.
The `*_reference` functions are the plain-jnp definitions the kernels are tested against; `quantize_*` make the int8
operands.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from model.kernels.common import compiler_params, dot, pad_axis


def quantize_per_channel(w: jax.Array, group: int = 0) -> tuple[jax.Array, jax.Array]:
  """Symmetric int8 weights. w [K, N] float -> (w_q [K, N] int8, scale [N] or [K // group, N] float32)."""
  w = w.astype(jnp.float32)
  if group:
    k, n = w.shape
    if k % group:
      raise ValueError(f"group={group} must divide the input dimension {k}")
    wg = w.reshape(k // group, group, n)
    scale = jnp.maximum(jnp.abs(wg).max(axis=1), 1e-12) / 127.0  # [K // group, N]
    w_q = jnp.clip(jnp.round(wg / scale[:, None, :]), -127, 127).astype(jnp.int8).reshape(k, n)
    return w_q, scale
  scale = jnp.maximum(jnp.abs(w).max(axis=0), 1e-12) / 127.0
  return jnp.clip(jnp.round(w / scale), -127, 127).astype(jnp.int8), scale


def quantize_per_token(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Symmetric dynamic int8 activations. x [M, K] float -> (x_q [M, K] int8, scale [M] float32)."""
  x = x.astype(jnp.float32)
  scale = jnp.maximum(jnp.abs(x).max(axis=1), 1e-12) / 127.0
  return jnp.clip(jnp.round(x / scale[:, None]), -127, 127).astype(jnp.int8), scale


def w8a16_reference(x, w_q, w_scale, group: int = 0):
  """Dequantise then matmul (float32 accumulation). Returns [M, N] in x's dtype."""
  if group:
    w = (w_q.astype(jnp.float32).reshape(-1, group, w_q.shape[1]) * w_scale[:, None, :]).reshape(w_q.shape)
  else:
    w = w_q.astype(jnp.float32) * w_scale[None, :]
  return jnp.dot(x.astype(jnp.float32), w, precision=jax.lax.Precision.HIGHEST).astype(x.dtype)


def w8a8_reference(x_q, x_scale, w_q, w_scale):
  """Exact int32 matmul, then both scales. Returns float32 [M, N]."""
  acc = jax.lax.dot_general(x_q, w_q, (((1,), (0,)), ((), ())), preferred_element_type=jnp.int32)
  return acc.astype(jnp.float32) * x_scale[:, None] * w_scale[None, :]


def _w8a16_kernel(x_ref, w_ref, s_ref, o_ref, *, block_k, num_k, grouped):
  def body(kk, acc):
    rows = pl.ds(pl.multiple_of(kk * block_k, block_k), block_k)
    x = x_ref[:, rows]
    w = w_ref[rows, :].astype(x.dtype)
    part = jax.lax.dot_general(x, w, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32,
                               precision=jax.lax.Precision.HIGHEST if x.dtype == jnp.float32 else None)
    return acc + (part * s_ref[kk, :][None, :] if grouped else part)

  acc = jax.lax.fori_loop(0, num_k, body, jnp.zeros(o_ref.shape, jnp.float32))
  if not grouped:
    acc = acc * s_ref[0, :][None, :]
  o_ref[...] = acc.astype(o_ref.dtype)


def _w8a8_kernel(x_ref, xs_ref, w_ref, ws_ref, o_ref, *, block_k, num_k):
  def body(kk, acc):
    rows = pl.ds(pl.multiple_of(kk * block_k, block_k), block_k)
    return acc + jax.lax.dot_general(x_ref[:, rows], w_ref[rows, :], (((1,), (0,)), ((), ())),
                                     preferred_element_type=jnp.int32)

  acc = jax.lax.fori_loop(0, num_k, body, jnp.zeros(o_ref.shape, jnp.int32))
  o_ref[...] = acc.astype(jnp.float32) * xs_ref[...][:, None] * ws_ref[0, :][None, :]


def _blocks(m, n, k, block_m, block_n, block_k):
  fit = lambda size, cap: min(cap, max(16, pl.next_power_of_2(size)))  # noqa: E731
  return block_m or fit(m, 64), block_n or fit(n, 128), block_k or fit(k, 128)


def w8a16_matmul(x: jax.Array, w_q: jax.Array, w_scale: jax.Array, *, group: int = 0, transposed: bool = False,
                 block_m: int | None = None, block_n: int | None = None, block_k: int | None = None,
                 interpret: bool | None = None) -> jax.Array:
  """x [M, K] float @ dequant(w_q [K, N] int8 ([N, K] if `transposed`), w_scale) -> [M, N] in x's dtype (see the
  module docstring)."""
  m, k = x.shape
  if w_q.dtype != jnp.int8 or w_q.ndim != 2 or w_q.shape[1 if transposed else 0] != k:
    raise ValueError(f"w_q must be int8 {'[N, K=' if transposed else '[K='}{k}{']' if transposed else ', N]'}; got "
                     f"{w_q.dtype} {w_q.shape}")
  n = w_q.shape[0 if transposed else 1]
  if group and k % group:
    raise ValueError(f"group={group} must divide the input dimension K={k}")
  expected = (k // group, n) if group else (n,)
  if w_scale.shape != expected:
    raise ValueError(f"w_scale shape {w_scale.shape} must be {expected} for group={group}")
  if group and (group < 16 or group & (group - 1)):
    raise ValueError(f"group={group} must be a power of two >= 16 (it is the kernel's K block)")
  ours = functools.partial(_pallas_w8a16, group=group, block_m=block_m, block_n=block_n, block_k=block_k)
  if interpret is not None:
    return ours(x, w_q.T if transposed else w_q, w_scale, interpret=interpret)
  return jax.lax.platform_dependent(
      x, w_q, w_scale, tpu=functools.partial(_tpu_w8a16, group=group, transposed=transposed),
      default=lambda x, w, s: ours(x, w.T if transposed else w, s, interpret=jax.default_backend() == "cpu"))


def _pallas_w8a16(x, w_q, w_scale, *, group, block_m, block_n, block_k, interpret):
  """Our Pallas kernel for CPU (interpret) and GPU (Triton); the arguments of `w8a16_matmul`, checked there."""
  (m, k), n = x.shape, w_q.shape[1]
  block_m, block_n, block_k = _blocks(m, n, k, block_m, block_n, block_k)
  if group:
    block_k = group
  mp, np_, kp = (pl.cdiv(a, b) * b for a, b in ((m, block_m), (n, block_n), (k, block_k)))
  xp = pad_axis(pad_axis(x, 0, mp), 1, kp)
  wp = pad_axis(pad_axis(w_q, 0, kp), 1, np_)
  scales = pad_axis(pad_axis(w_scale.astype(jnp.float32).reshape(-1, n), 0, kp // block_k if group else 1), 1, np_)
  kernel = functools.partial(_w8a16_kernel, block_k=block_k, num_k=kp // block_k, grouped=bool(group))
  out = pl.pallas_call(
      kernel, grid=(mp // block_m, np_ // block_n),
      in_specs=[pl.BlockSpec((block_m, kp), lambda i, j: (i, 0)), pl.BlockSpec((kp, block_n), lambda i, j: (0, j)),
                pl.BlockSpec((scales.shape[0], block_n), lambda i, j: (0, j))],
      out_specs=pl.BlockSpec((block_m, block_n), lambda i, j: (i, j)),
      out_shape=jax.ShapeDtypeStruct((mp, np_), x.dtype), interpret=interpret,
      compiler_params=compiler_params(interpret), name="w8a16_matmul")(xp, wp, scales)
  return out[:m, :n]


def w8a8_matmul(x_q: jax.Array, x_scale: jax.Array, w_q: jax.Array, w_scale: jax.Array, *, transposed: bool = False,
                block_m: int | None = None, block_n: int | None = None, block_k: int | None = None,
                interpret: bool | None = None) -> jax.Array:
  """int8 x_q [M, K] (scales [M]) @ int8 w_q [K, N] ([N, K] if `transposed`; scales [N]) with int32 accumulation ->
  float32 [M, N]."""
  m, k = x_q.shape
  if x_q.dtype != jnp.int8 or w_q.dtype != jnp.int8 or w_q.ndim != 2 or w_q.shape[1 if transposed else 0] != k:
    raise ValueError(f"w8a8_matmul needs int8 x_q [M, K] and w_q {'[N, K]' if transposed else '[K, N]'}; got "
                     f"{x_q.dtype} {x_q.shape}, {w_q.dtype} {w_q.shape}")
  n = w_q.shape[0 if transposed else 1]
  if x_scale.shape != (m,) or w_scale.shape != (n,):
    raise ValueError(f"x_scale {x_scale.shape} must be ({m},) and w_scale {w_scale.shape} must be ({n},)")
  ours = functools.partial(_pallas_w8a8, block_m=block_m, block_n=block_n, block_k=block_k)
  if interpret is not None:
    return ours(x_q, x_scale, w_q.T if transposed else w_q, w_scale, interpret=interpret)
  return jax.lax.platform_dependent(
      x_q, x_scale, w_q, w_scale, tpu=functools.partial(_tpu_w8a8, transposed=transposed),
      default=lambda x, xs, w, s: ours(x, xs, w.T if transposed else w, s, interpret=jax.default_backend() == "cpu"))


def _pallas_w8a8(x_q, x_scale, w_q, w_scale, *, block_m, block_n, block_k, interpret):
  """Our Pallas kernel for CPU (interpret) and GPU (Triton); the arguments of `w8a8_matmul`, checked there."""
  (m, k), n = x_q.shape, w_q.shape[1]
  block_m, block_n, block_k = _blocks(m, n, k, block_m, block_n, block_k)
  mp, np_, kp = (pl.cdiv(a, b) * b for a, b in ((m, block_m), (n, block_n), (k, block_k)))
  xp = pad_axis(pad_axis(x_q, 0, mp), 1, kp)
  wp = pad_axis(pad_axis(w_q, 0, kp), 1, np_)
  xs = pad_axis(x_scale.astype(jnp.float32), 0, mp)
  ws = pad_axis(w_scale.astype(jnp.float32).reshape(1, n), 1, np_)
  kernel = functools.partial(_w8a8_kernel, block_k=block_k, num_k=kp // block_k)
  out = pl.pallas_call(
      kernel, grid=(mp // block_m, np_ // block_n),
      in_specs=[pl.BlockSpec((block_m, kp), lambda i, j: (i, 0)), pl.BlockSpec((block_m,), lambda i, j: (i,)),
                pl.BlockSpec((kp, block_n), lambda i, j: (0, j)), pl.BlockSpec((1, block_n), lambda i, j: (0, j))],
      out_specs=pl.BlockSpec((block_m, block_n), lambda i, j: (i, j)),
      out_shape=jax.ShapeDtypeStruct((mp, np_), jnp.float32), interpret=interpret,
      compiler_params=compiler_params(interpret), name="w8a8_matmul")(xp, xs, wp, ws)
  return out[:m, :n]


# -- TPU (Mosaic) variants ------------------------------------------------------------------------------------------


def _tpu_blocks(m, n, k, row_tile, k_unit=128):
  """Mosaic blocks: rows a multiple of `row_tile` (8 float32, 16 bf16, 32 int8) up to 256; columns 256 (128 for
  narrow N), the last column block overrunning N where 256 does not divide it (Mosaic drops its out-of-range writes,
  so the weight is never padded along N); K the largest multiple of `k_unit` up to 512 that divides K, so that the
  weight is used in place: decoding reads each int8 weight once per step instead of copying it into a padded one
  first. Only a K off the `k_unit` grid is padded. Returns (block_m, block_n, block_k, padded m, padded k)."""
  bm = min(256, pl.cdiv(m, row_tile) * row_tile)
  bn = 256 if n >= 256 else 128
  if k % k_unit == 0:
    bk = max(c for c in range(k_unit, max(512, k_unit) + 1, k_unit) if k % c == 0)
  else:
    bk = k_unit * max(1, min(512, pl.cdiv(k, 128) * 128) // k_unit)
  return bm, bn, bk, pl.cdiv(m, bm) * bm, pl.cdiv(k, bk) * bk


def _tpu_w8a16_kernel(x_ref, w_ref, s_ref, o_ref, acc_ref, *, group, block_k, transposed):
  kk = pl.program_id(2)
  w_k = 1 if transposed else 0  # the weight block's K axis: [block_n, block_k] or [block_k, block_n]

  @pl.when(kk == 0)
  def _init():
    acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

  x = x_ref[...]
  if group:  # s_ref holds every group's scales for this column block: [K // group, block_n]
    for g in range(block_k // group):
      rows = slice(g * group, (g + 1) * group)
      scale = s_ref[pl.ds(kk * (block_k // group) + g, 1), :]
      w = w_ref[:, rows] if transposed else w_ref[rows, :]
      acc_ref[...] += dot(x[:, rows], w.astype(x.dtype), 1, w_k) * scale
  else:
    acc_ref[...] += dot(x, w_ref[...].astype(x.dtype), 1, w_k)

  @pl.when(kk == pl.num_programs(2) - 1)
  def _finish():
    acc = acc_ref[...] if group else acc_ref[...] * s_ref[...]
    o_ref[...] = acc.astype(o_ref.dtype)


def _weight_spec(bn, bk, transposed):
  """The int8 weight's block: [block_k, block_n] of w [K, N], or [block_n, block_k] of w [N, K] (transposed)."""
  if transposed:
    return pl.BlockSpec((bn, bk), lambda i, j, kk: (j, kk))
  return pl.BlockSpec((bk, bn), lambda i, j, kk: (kk, j))


def _pad_weight(w_q, kp, transposed):
  """w_q zero-padded along K to kp (as is when K needs no padding: see `_tpu_blocks`)."""
  return pad_axis(w_q, 1 if transposed else 0, kp)


def _tpu_w8a16(x, w_q, w_scale, *, group, transposed):
  """TPU path of `w8a16_matmul` (arguments checked there)."""
  (m, k), n = x.shape, w_q.shape[0 if transposed else 1]
  unit = 128 * group // math.gcd(128, group) if group else 128
  bm, bn, bk, mp, kp = _tpu_blocks(m, n, k, 8 if x.dtype == jnp.float32 else 16, unit)
  xp = pad_axis(pad_axis(x, 0, mp), 1, kp)
  wp = _pad_weight(w_q, kp, transposed)
  scales = w_scale.astype(jnp.float32).reshape(-1, n)
  if group:
    scales = pad_axis(scales, 0, kp // group)
  out = pl.pallas_call(
      functools.partial(_tpu_w8a16_kernel, group=group, block_k=bk, transposed=transposed),
      grid=(mp // bm, pl.cdiv(n, bn), kp // bk),
      in_specs=[pl.BlockSpec((bm, bk), lambda i, j, kk: (i, kk)), _weight_spec(bn, bk, transposed),
                pl.BlockSpec((scales.shape[0], bn), lambda i, j, kk: (0, j))],
      out_specs=pl.BlockSpec((bm, bn), lambda i, j, kk: (i, j)),
      scratch_shapes=[pltpu.VMEM((bm, bn), jnp.float32)],
      compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")),
      out_shape=jax.ShapeDtypeStruct((mp, n), x.dtype), name="w8a16_matmul_tpu")(xp, wp, scales)
  return out[:m]


def _tpu_w8a8_kernel(x_ref, xs_ref, w_ref, ws_ref, o_ref, acc_ref, *, transposed):
  kk = pl.program_id(2)

  @pl.when(kk == 0)
  def _init():
    acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.int32)

  acc_ref[...] += jax.lax.dot_general(x_ref[...], w_ref[...], (((1,), (1 if transposed else 0,)), ((), ())),
                                      preferred_element_type=jnp.int32)

  @pl.when(kk == pl.num_programs(2) - 1)
  def _finish():
    o_ref[...] = acc_ref[...].astype(jnp.float32) * xs_ref[...] * ws_ref[...]


def _tpu_w8a8(x_q, x_scale, w_q, w_scale, *, transposed):
  """TPU path of `w8a8_matmul` (arguments checked there)."""
  (m, k), n = x_q.shape, w_q.shape[0 if transposed else 1]
  bm, bn, bk, mp, kp = _tpu_blocks(m, n, k, 32)
  xp = pad_axis(pad_axis(x_q, 0, mp), 1, kp)
  wp = _pad_weight(w_q, kp, transposed)
  xs = pad_axis(x_scale.astype(jnp.float32).reshape(m, 1), 0, mp)
  ws = w_scale.astype(jnp.float32).reshape(1, n)
  out = pl.pallas_call(
      functools.partial(_tpu_w8a8_kernel, transposed=transposed), grid=(mp // bm, pl.cdiv(n, bn), kp // bk),
      in_specs=[pl.BlockSpec((bm, bk), lambda i, j, kk: (i, kk)), pl.BlockSpec((bm, 1), lambda i, j, kk: (i, 0)),
                _weight_spec(bn, bk, transposed), pl.BlockSpec((1, bn), lambda i, j, kk: (0, j))],
      out_specs=pl.BlockSpec((bm, bn), lambda i, j, kk: (i, j)),
      scratch_shapes=[pltpu.VMEM((bm, bn), jnp.int32)],
      compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")),
      out_shape=jax.ShapeDtypeStruct((mp, n), jnp.float32), name="w8a8_matmul_tpu")(xp, xs, wp, ws)
  return out[:m]
