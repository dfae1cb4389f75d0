"""SparseGPT (Frantar and Alistarh, 2023): one-shot pruning with OBS reconstruction, and magnitude pruning.

Weights use our [in, out] layout (y = x @ W); H is the [in, in] Hessian 2/n X^T X of the layer's inputs."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from infer.compress import obs
from model import quantizer
from infer.compress.result import Compressed


def _check(sparsity: float, prune_n: int, prune_m: int) -> None:
  if prune_n or prune_m:
    if not 0 < prune_n < prune_m:
      raise ValueError(f"n:m pruning needs 0 < prune_n < prune_m, got {prune_n}:{prune_m}")
  elif not 0.0 <= sparsity < 1.0:
    raise ValueError(f"sparsity={sparsity} must be in [0, 1)")


def prune_layer(w: jax.Array, h: jax.Array, *, sparsity: float = 0.5, prune_n: int = 0, prune_m: int = 0,
                block_size: int = 128, damp: float = 0.01, quant_bits: int | None = None,
                symmetric: bool = False) -> Compressed:
  """Prunes w [in, out] to `sparsity` (unstructured, mask chosen per block of `block_size` input columns) or to
  `prune_n` zeros in every `prune_m` consecutive inputs of each output (n:m), updating the kept weights to
  reconstruct the layer's output on inputs with Hessian h [in, in]. With `quant_bits`, the kept weights are
  quantized in the same sweep (joint compression) on a per-output min-max grid."""
  _check(sparsity, prune_n, prune_m)
  u, dead = obs.inverse_hessian_factor(h, damp)
  wt = jnp.where(dead[None, :], 0.0, w.astype(jnp.float32).T)  # [out, in]
  bits = quant_bits or 0
  scale = zero = None
  if bits:
    scale, zero = quantizer.grid(wt, bits, symmetric)  # per output row, [out]
  res = obs.sweep(wt, u, block_size=block_size, sparsity=0.0 if prune_n else sparsity, prune_n=prune_n,
                  prune_m=prune_m, bits=bits, symmetric=symmetric,
                  static_scale=None if scale is None else jnp.broadcast_to(scale[:, None], wt.shape),
                  static_zero=None if zero is None else jnp.broadcast_to(zero[:, None], wt.shape))
  out = Compressed(res.weights.T, loss=float(res.loss.sum()))
  if bits:
    out.bits, out.scale, out.zero = bits, scale[None, :], zero[None, :]
    out.codes = quantizer.codes(out.weight, out.scale, out.zero, bits)
  return out


def magnitude_prune(w: jax.Array, *, sparsity: float = 0.5, prune_n: int = 0, prune_m: int = 0) -> Compressed:
  """Baseline: zero the smallest |w| of the whole matrix (unstructured) or of every n:m group of inputs."""
  _check(sparsity, prune_n, prune_m)
  w = w.astype(jnp.float32)
  if prune_n:
    k, n = w.shape
    if k % prune_m:
      raise ValueError(f"prune_m={prune_m} must divide the {k} inputs")
    groups = jnp.abs(w).T.reshape(n, k // prune_m, prune_m)
    ranks = jnp.argsort(jnp.argsort(groups, axis=-1), axis=-1)
    mask = (ranks < prune_n).reshape(n, k).T
  else:
    count = int(round(sparsity * w.size))
    flat = jnp.zeros(w.size, bool)
    if count:
      flat = flat.at[jax.lax.top_k(-jnp.abs(w).reshape(-1), count)[1]].set(True)
    mask = flat.reshape(w.shape)
  return Compressed(jnp.where(mask, 0.0, w))
