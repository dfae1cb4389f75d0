"""Uniform min-max quantization grids, shared by GPTQ, round-to-nearest and SparseGPT's joint quantization.

A grid maps a float w to an integer code c = clip(round(w / scale) + zero, 0, 2^bits - 1) and back to
scale * (c - zero). Grids are per output row (channel) or per (row, group of input columns). Asymmetric grids span
[min(w, 0), max(w, 0)], so zero is always exactly representable (a pruned weight stays 0 after quantization);
symmetric grids are centred on zero with zero = 2^(bits-1) (the mid code).
"""

from __future__ import annotations

import jax.numpy as jnp


def max_code(bits: int) -> int:
  if not 2 <= bits <= 8:
    raise ValueError(f"bits={bits}: quantization supports 2 to 8 bits")
  return 2 ** bits - 1


def grid(w: jnp.ndarray, bits: int, symmetric: bool) -> tuple[jnp.ndarray, jnp.ndarray]:
  """w [rows, cols] float -> (scale [rows], zero [rows]) float32 spanning each row."""
  maxq = max_code(bits)
  w = w.astype(jnp.float32)
  lo, hi = jnp.minimum(w.min(axis=1), 0.0), jnp.maximum(w.max(axis=1), 0.0)
  if symmetric:
    hi = jnp.maximum(-lo, hi)
    lo = -hi
  flat = hi == lo  # an all-zero row: any positive scale will do
  lo, hi = jnp.where(flat, -1.0, lo), jnp.where(flat, 1.0, hi)
  scale = (hi - lo) / maxq
  zero = jnp.full_like(scale, (maxq + 1) // 2) if symmetric else jnp.round(-lo / scale)
  return scale, zero


def codes(w: jnp.ndarray, scale: jnp.ndarray, zero: jnp.ndarray, bits: int) -> jnp.ndarray:
  """Integer codes of w (any shape) under a grid broadcastable to it, as int32 in [0, 2^bits)."""
  return jnp.clip(jnp.round(w / scale) + zero, 0, max_code(bits)).astype(jnp.int32)


def dequantize(c: jnp.ndarray, scale: jnp.ndarray, zero: jnp.ndarray) -> jnp.ndarray:
  return (scale * (c.astype(jnp.float32) - zero)).astype(jnp.float32)


def fake_quantize(w: jnp.ndarray, scale: jnp.ndarray, zero: jnp.ndarray, bits: int) -> jnp.ndarray:
  """The grid point nearest to w (round to nearest), float32."""
  return dequantize(codes(w, scale, zero, bits), scale, zero)


def group_grids(w: jnp.ndarray, bits: int, symmetric: bool, group_size: int) -> tuple[jnp.ndarray, jnp.ndarray]:
  """w [rows, cols] -> (scale, zero) [rows, groups] over consecutive column groups (group_size 0: one group)."""
  rows, cols = w.shape
  size = group_size or cols
  if cols % size:
    raise ValueError(f"group_size={group_size} must divide the {cols} input columns")
  g = w.reshape(rows, cols // size, size).transpose(1, 0, 2)  # [groups, rows, size]
  scales, zeros = zip(*(grid(g[i], bits, symmetric) for i in range(g.shape[0])))
  return jnp.stack(scales, 1), jnp.stack(zeros, 1)


def round_to_nearest(w: jnp.ndarray, bits: int, symmetric: bool = False, group_size: int = 0):
  """RTN baseline. w [rows, cols] -> (dequantized w [rows, cols], scale [rows, groups], zero [rows, groups])."""
  scale, zero = group_grids(w, bits, symmetric, group_size)
  size = group_size or w.shape[1]
  expand = lambda a: jnp.repeat(a, size, axis=1)  # noqa: E731
  return fake_quantize(w.astype(jnp.float32), expand(scale), expand(zero), bits), scale, zero


# -- ternary grids (QMoE): each row quantized to {lo, 0, hi} with lo = min(row, 0) and hi = max(row, 0) ---------------
# Codes: 0 -> 0, 1 -> lo (negative), 2 -> hi (positive).


def ternary_grid(w: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
  """w [rows, cols] -> (lo [rows] <= 0, hi [rows] >= 0) float32."""
  w = w.astype(jnp.float32)
  return jnp.minimum(w.min(axis=1), 0.0), jnp.maximum(w.max(axis=1), 0.0)


def ternary_codes(w: jnp.ndarray, lo: jnp.ndarray, hi: jnp.ndarray, dead_zone: float = 0.5) -> jnp.ndarray:
  """int32 codes 0/1/2 (0, lo, hi) for every w (grids broadcastable to w): lo below dead_zone * lo, hi above
  dead_zone * hi, else 0. dead_zone 0.5 rounds to the nearest point; larger values (< 1) round more weights to 0."""
  return jnp.where(w < lo * dead_zone, 1, jnp.where(w > hi * dead_zone, 2, 0)).astype(jnp.int32)


def ternary_dequantize(c: jnp.ndarray, lo: jnp.ndarray, hi: jnp.ndarray) -> jnp.ndarray:
  zero = jnp.zeros_like(lo * hi, jnp.float32)
  return jnp.where(c == 1, lo + zero, jnp.where(c == 2, hi + zero, zero)).astype(jnp.float32)


def ternary_round_to_nearest(w: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
  """Ternary RTN baseline. w [rows, cols] -> (dequantized [rows, cols], lo [rows], hi [rows])."""
  lo, hi = ternary_grid(w)
  return ternary_dequantize(ternary_codes(w, lo[:, None], hi[:, None]), lo[:, None], hi[:, None]), lo, hi
