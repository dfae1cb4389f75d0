"""The optimal-brain-surgeon column sweep shared by SparseGPT and GPTQ.

Weights here are [rows, cols] = [outputs, inputs] (the papers' layout; callers transpose our [in, out] weights) and H
is the [cols, cols] input Hessian 2/n X X^T of the layer's loss ||W X - W' X||^2. Columns are processed left to
right: column i is pruned and/or quantized, and its error is spread over the not-yet-processed columns with row i of
U, the upper Cholesky factor of H^-1 (U[i, i:] / U[i, i] is the OBS update given that columns < i are fixed).
Updates inside a block of `block_size` columns are applied at once per column; the rest of the matrix receives the
block's errors in one matmul at the end of the block ("lazy batch updates").
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from model import quantizer


def inverse_hessian_factor(h: jax.Array, damp: float) -> tuple[jax.Array, jax.Array]:
  """H [k, k] -> (U [k, k] upper triangular with U^T U = (H + damp * mean(diag H) I)^-1, dead [k] bool).

  Dead inputs (diag H == 0: never active in calibration) get an identity row/column so H stays invertible; their
  weights carry no information and callers zero them."""
  if damp < 0:
    raise ValueError(f"damp={damp} must be >= 0 (a fraction of the mean Hessian diagonal)")
  u, dead = factor_unchecked(h, damp)
  if not bool(jnp.all(jnp.isfinite(u))):
    raise ValueError(f"the damped Hessian is not positive definite at damp={damp}; raise damp (e.g. 0.1)")
  return u, dead


def factor_unchecked(h: jax.Array, damp: float) -> tuple[jax.Array, jax.Array]:
  """`inverse_hessian_factor` without the finiteness check, so it can be vmapped (check the result yourself)."""
  h = h.astype(jnp.float32)
  k = h.shape[0]
  dead = jnp.diag(h) == 0
  eye = jnp.eye(k, dtype=jnp.float32)
  h = h + jnp.diag(dead.astype(jnp.float32))
  h = h + damp * jnp.mean(jnp.diag(h)) * eye
  hinv = jax.scipy.linalg.cho_solve((jnp.linalg.cholesky(h), True), eye)
  return jnp.linalg.cholesky(hinv).T, dead


@dataclasses.dataclass
class SweepResult:
  weights: jax.Array  # [rows, cols] float32: the compressed weights (pruned entries exactly 0)
  mask: jax.Array  # [rows, cols] bool: True where pruned
  loss: jax.Array  # [rows] float32: the OBS estimate of each row's error, sum (w - q)^2 / U_ii^2 / 2
  scale: jax.Array | None  # [rows, groups] grids found during the sweep (dynamic group grids), else None
  zero: jax.Array | None


def unstructured_block_mask(w1: jax.Array, u_diag: jax.Array, sparsity: float) -> jax.Array:
  """The round(sparsity * size) entries of the block w1 [rows, c] with the smallest w^2 / U_jj^2, as a bool mask."""
  k = int(round(sparsity * w1.size))
  score = (w1 * w1 / (u_diag * u_diag)[None, :]).reshape(-1)
  mask = jnp.zeros(w1.size, bool)
  if k:
    mask = mask.at[jax.lax.top_k(-score, k)[1]].set(True)
  return mask.reshape(w1.shape)


def _n_smallest(score: jax.Array, n: int) -> jax.Array:
  """score [rows, m] -> bool mask of the n smallest entries of each row."""
  ranks = jnp.argsort(jnp.argsort(score, axis=1), axis=1)
  return ranks < n


@functools.partial(jax.jit, static_argnames=("prune_n", "prune_m", "bits", "symmetric", "group_size", "ternary",
                                             "dead_zone"))
def _sweep_block(w1, u1, mask1, scale_cols, zero_cols, *, prune_n, prune_m, bits, symmetric, group_size, ternary,
                 dead_zone=0.5):
  """One block: w1 [rows, c], u1 [c, c], mask1 [rows, c] (preset unstructured mask), scale/zero_cols [rows, c]
  (static grids, or the ternary lo/hi; ignored when group_size > 0, whose grids are found on the updated weights at
  each group start)."""
  rows, count = w1.shape
  u_diag = jnp.diag(u1)
  groups = count // group_size if group_size else 1

  def body(i, carry):
    w1, q1, err1, loss, mask1, scale, zero, g_scale, g_zero = carry
    if prune_n:
      def pick(mask1):
        cols = jax.lax.dynamic_slice(w1, (0, i), (rows, prune_m))
        d = jax.lax.dynamic_slice(u_diag, (i,), (prune_m,))
        return jax.lax.dynamic_update_slice(mask1, _n_smallest(cols * cols / (d * d)[None, :], prune_n), (0, i))
      mask1 = jax.lax.cond(i % prune_m == 0, pick, lambda m: m, mask1)
    w = jax.lax.dynamic_index_in_dim(w1, i, axis=1, keepdims=False)
    pruned = jax.lax.dynamic_index_in_dim(mask1, i, axis=1, keepdims=False)
    q = jnp.where(pruned, 0.0, w)
    if ternary:
      lo = jax.lax.dynamic_index_in_dim(scale_cols, i, axis=1, keepdims=False)
      hi = jax.lax.dynamic_index_in_dim(zero_cols, i, axis=1, keepdims=False)
      q = quantizer.ternary_dequantize(quantizer.ternary_codes(q, lo, hi, dead_zone), lo, hi)
    elif bits:
      if group_size:
        def new_grid(args):
          _, _, g_scale, g_zero = args
          s, z = quantizer.grid(jax.lax.dynamic_slice(w1, (0, i), (rows, group_size)), bits, symmetric)
          g = i // group_size
          return s, z, g_scale.at[:, g].set(s), g_zero.at[:, g].set(z)
        scale, zero, g_scale, g_zero = jax.lax.cond(i % group_size == 0, new_grid, lambda a: a,
                                                    (scale, zero, g_scale, g_zero))
      else:
        scale = jax.lax.dynamic_index_in_dim(scale_cols, i, axis=1, keepdims=False)
        zero = jax.lax.dynamic_index_in_dim(zero_cols, i, axis=1, keepdims=False)
      q = jnp.where(pruned, 0.0, quantizer.fake_quantize(q, scale, zero, bits))
    d = u1[i, i]
    err = (w - q) / d
    w1 = w1 - err[:, None] * u1[i][None, :]  # u1 is upper triangular: processed columns are untouched
    q1 = jax.lax.dynamic_update_index_in_dim(q1, q, i, axis=1)
    err1 = jax.lax.dynamic_update_index_in_dim(err1, err, i, axis=1)
    return w1, q1, err1, loss + err * err / 2, mask1, scale, zero, g_scale, g_zero

  zeros = jnp.zeros_like(w1)
  init = (w1, zeros, zeros, jnp.zeros(rows, jnp.float32), mask1, jnp.ones(rows, jnp.float32),
          jnp.zeros(rows, jnp.float32), jnp.ones((rows, groups), jnp.float32), jnp.zeros((rows, groups), jnp.float32))
  _, q1, err1, loss, mask1, _, _, g_scale, g_zero = jax.lax.fori_loop(0, count, body, init)
  return q1, err1, loss, mask1, g_scale, g_zero


def sweep(w: jax.Array, u: jax.Array, *, block_size: int = 128, sparsity: float = 0.0, prune_n: int = 0,
          prune_m: int = 0, bits: int = 0, symmetric: bool = False, group_size: int = 0,
          static_scale: jax.Array | None = None, static_zero: jax.Array | None = None,
          ternary: bool = False, dead_zone: float = 0.5) -> SweepResult:
  """Prunes and/or quantizes w [rows, cols] column by column with OBS error compensation (see the module docstring).

  Pruning: unstructured `sparsity` (mask chosen per block of columns by w^2 / U_jj^2, the adaptive mask selection of
  SparseGPT) or `prune_n` of every `prune_m` consecutive columns per row (chosen when the group's first column is
  reached). Quantization (bits > 0): with static grids `static_scale`/`static_zero` [rows, cols] (one per column),
  or, with group_size > 0, a min-max grid per group found on the error-updated weights when the group starts.
  `ternary`: quantize to {lo, 0, hi} per row with lo = static_scale, hi = static_zero (QMoE), a weight becoming 0
  unless it lies beyond dead_zone times lo or hi (`quantizer.ternary_codes`)."""
  rows, cols = w.shape
  if prune_n and (prune_m <= prune_n or block_size % prune_m or cols % prune_m):
    raise ValueError(f"n:m pruning {prune_n}:{prune_m} needs n < m and m dividing block_size={block_size} and the "
                     f"{cols} input columns")
  if bits and group_size and (block_size % group_size or cols % group_size):
    raise ValueError(f"group_size={group_size} must divide block_size={block_size} and the {cols} input columns")
  if (bits or ternary) and not group_size and static_scale is None:
    raise ValueError("quantizing without groups needs static grids (static_scale, static_zero)")
  w = w.astype(jnp.float32)
  dummy = jnp.zeros((rows, 1), jnp.float32)
  qs, masks, scales, zeros = [], [], [], []
  loss = jnp.zeros(rows, jnp.float32)
  for i1 in range(0, cols, block_size):
    i2 = min(i1 + block_size, cols)
    w1, u1 = w[:, i1:i2], u[i1:i2, i1:i2]
    mask1 = (unstructured_block_mask(w1, jnp.diag(u1), sparsity) if sparsity and not prune_n
             else jnp.zeros(w1.shape, bool))
    static = (bits and not group_size) or ternary
    q1, err1, loss1, mask1, g_scale, g_zero = _sweep_block(
        w1, u1, mask1, static_scale[:, i1:i2] if static else dummy, static_zero[:, i1:i2] if static else dummy,
        prune_n=prune_n, prune_m=prune_m, bits=bits, symmetric=symmetric, group_size=group_size if bits else 0,
        ternary=ternary, dead_zone=dead_zone)
    qs.append(q1)
    masks.append(mask1)
    scales.append(g_scale)
    zeros.append(g_zero)
    loss = loss + loss1
    if i2 < cols:
      w = w.at[:, i2:].add(-err1 @ u[i1:i2, i2:])
  dynamic = bits and group_size
  return SweepResult(jnp.concatenate(qs, 1), jnp.concatenate(masks, 1), loss,
                     jnp.concatenate(scales, 1) if dynamic else None, jnp.concatenate(zeros, 1) if dynamic else None)
