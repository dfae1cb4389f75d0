"""int8 matmuls in Pallas: W8A16 (weights int8, dequantised in the kernel) and W8A8 (int8 x int8, int32 accumulation).

* `w8a16_matmul(x, w_q, w_scale)`: x [M, K] float (bf16/f32), w_q [K, N] int8, w_scale [N] (per output channel) or
  [K // group, N] (per group of `group` input rows) float32 -> [M, N] in x's dtype. Per-channel scales are applied
  once to the float32 accumulator; per-group scales to each group's partial product.
* `w8a8_matmul(x_q, x_scale, w_q, w_scale)`: x_q [M, K] int8 with per-token scales x_scale [M], w_q [K, N] int8 with
  per-channel scales w_scale [N] -> float32 [M, N] = (x_q @ w_q in int32) * x_scale[:, None] * w_scale[None, :].

Shapes are padded to the blocks with zeros (exact). Interpret mode on CPU, Triton on GPU. The `*_reference`
functions are the plain-jnp definitions the kernels are tested against; `quantize_*` make the int8 operands.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from model.kernels.common import compiler_params, pad_axis


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


def w8a16_matmul(x: jax.Array, w_q: jax.Array, w_scale: jax.Array, *, group: int = 0, block_m: int | None = None,
                 block_n: int | None = None, block_k: int | None = None, interpret: bool | None = None) -> jax.Array:
  """x [M, K] float @ dequant(w_q [K, N] int8, w_scale) -> [M, N] in x's dtype (see module docstring)."""
  m, k = x.shape
  if w_q.dtype != jnp.int8 or w_q.ndim != 2 or w_q.shape[0] != k:
    raise ValueError(f"w_q must be int8 [K={k}, N]; got {w_q.dtype} {w_q.shape}")
  n = w_q.shape[1]
  if group and k % group:
    raise ValueError(f"group={group} must divide the input dimension K={k}")
  expected = (k // group, n) if group else (n,)
  if w_scale.shape != expected:
    raise ValueError(f"w_scale shape {w_scale.shape} must be {expected} for group={group}")
  block_m, block_n, block_k = _blocks(m, n, k, block_m, block_n, block_k)
  if group:
    block_k = group
    if group < 16 or group & (group - 1):
      raise ValueError(f"group={group} must be a power of two >= 16 (it is the kernel's K block)")
  interpret = jax.default_backend() == "cpu" if interpret is None else interpret
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


def w8a8_matmul(x_q: jax.Array, x_scale: jax.Array, w_q: jax.Array, w_scale: jax.Array, *, block_m: int | None = None,
                block_n: int | None = None, block_k: int | None = None, interpret: bool | None = None) -> jax.Array:
  """int8 x_q [M, K] (scales [M]) @ int8 w_q [K, N] (scales [N]) with int32 accumulation -> float32 [M, N]."""
  m, k = x_q.shape
  if x_q.dtype != jnp.int8 or w_q.dtype != jnp.int8 or w_q.shape[0] != k:
    raise ValueError(f"w8a8_matmul needs int8 x_q [M, K] and w_q [K, N]; got {x_q.dtype} {x_q.shape}, "
                     f"{w_q.dtype} {w_q.shape}")
  n = w_q.shape[1]
  if x_scale.shape != (m,) or w_scale.shape != (n,):
    raise ValueError(f"x_scale {x_scale.shape} must be ({m},) and w_scale {w_scale.shape} must be ({n},)")
  block_m, block_n, block_k = _blocks(m, n, k, block_m, block_n, block_k)
  interpret = jax.default_backend() == "cpu" if interpret is None else interpret
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
