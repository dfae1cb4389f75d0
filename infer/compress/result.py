"""What compressing one weight matrix returns."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass
class Compressed:
  """One compressed weight in our [in, out] layout.

  weight [in, out] float32 is what the model computes with (pruned entries exactly 0, quantized entries on their
  grid). Quantized layers also carry codes [in, out] int32 in [0, 2^bits) with scale/zero [groups, out] float32 over
  consecutive input groups of group_size (0: one group), so that weight == scale * (codes - zero)."""

  weight: jax.Array
  bits: int = 0
  group_size: int = 0
  codes: jax.Array | None = None
  scale: jax.Array | None = None
  zero: jax.Array | None = None
  loss: float = float("nan")  # OBS estimate of ||W X - W' X||^2 per calibration token (H = 2/n X^T X), else nan

  @property
  def sparsity(self) -> float:
    return float(jnp.mean(self.weight == 0))
