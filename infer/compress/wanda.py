"""Activation-aware weight scores: Wanda pruning (Sun et al., 2024) and OWL's per-block sparsities (Yin et al., 2024).

Both score a weight by |W_ij| * ||X_i||, its magnitude times the norm of the input feature it multiplies, so a small
weight on an outlier feature (the large activations of trained LLMs) is kept where magnitude pruning would cut it.
Weights use our [in, out] layout (y = x @ W); H is the [in, in] Hessian 2/n X^T X of the layer's inputs, whose
diagonal gives the input norms (||X_i|| = sqrt(n/2 * H_ii); the constant does not change any ranking)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from infer.compress.result import Compressed


def scores(w: jax.Array, h: jax.Array) -> jax.Array:
  """w [in, out], h [in, in] -> Wanda scores |w| * sqrt(diag h) [in, out] float32."""
  norms = jnp.sqrt(jnp.maximum(jnp.diag(h).astype(jnp.float32), 0.0))
  return jnp.abs(w.astype(jnp.float32)) * norms[:, None]


def prune_layer(w: jax.Array, h: jax.Array, *, sparsity: float = 0.5, prune_n: int = 0,
                prune_m: int = 0) -> Compressed:
  """Wanda: zero the lowest-scoring round(sparsity * in) inputs of every output of w [in, out] (the paper's
  per-output comparison group), or the `prune_n` lowest of every `prune_m` consecutive inputs (n:m). The kept
  weights are not updated."""
  k, n = w.shape
  s = scores(w, h)
  if prune_n:
    if not 0 < prune_n < prune_m or k % prune_m:
      raise ValueError(f"n:m pruning {prune_n}:{prune_m} needs 0 < n < m and m dividing the {k} inputs")
    groups = s.T.reshape(n, k // prune_m, prune_m)
    mask = (jnp.argsort(jnp.argsort(groups, axis=-1), axis=-1) < prune_n).reshape(n, k).T
  else:
    if not 0.0 <= sparsity < 1.0:
      raise ValueError(f"sparsity={sparsity} must be in [0, 1)")
    ranks = jnp.argsort(jnp.argsort(s, axis=0), axis=0)  # 0 = the lowest score of its output
    mask = ranks < int(round(sparsity * k))
  return Compressed(jnp.where(mask, 0.0, w.astype(jnp.float32)))


def outliers(w: jax.Array, h: jax.Array, threshold: float) -> tuple[int, int]:
  """(number of outlier weights, number of weights) of one layer: scores above `threshold` times the layer's mean
  score (OWL's layerwise outlier distribution counts these)."""
  s = scores(w, h)
  return int(jnp.sum(s > threshold * jnp.mean(s))), int(s.size)


def owl_sparsities(outlier_ratios, sparsity: float, lam: float) -> list[float]:
  """Per-block sparsities from per-block outlier ratios (OWL): ratios min-max scaled to [0, 2 lam], centred so the
  blocks' densities average 1 - sparsity; a block with more outliers keeps more weights. Clipped to [0, 0.99]."""
  r = np.asarray(outlier_ratios, np.float64)
  if r.size == 0 or np.ptp(r) == 0:
    return [float(sparsity)] * r.size
  spread = (r - r.min()) / np.ptp(r) * (2 * lam)
  density = spread - spread.mean() + (1.0 - sparsity)
  return [float(x) for x in np.clip(1.0 - density, 0.0, 0.99)]
