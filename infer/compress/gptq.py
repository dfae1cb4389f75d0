"""GPTQ (Frantar et al., 2023): one-shot weight quantization with OBS error compensation, and round-to-nearest.

Weights use our [in, out] layout (y = x @ W); H is the [in, in] Hessian 2/n X^T X of the layer's inputs."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from infer.compress import obs
from model import quantizer
from infer.compress.result import Compressed


def _check(bits: int, group_size: int, k: int) -> None:
  quantizer.max_code(bits)
  if group_size < 0 or (group_size and k % group_size):
    raise ValueError(f"group_size={group_size} must be 0 (per output channel) or divide the {k} inputs")


def quantize_layer(w: jax.Array, h: jax.Array, *, bits: int, group_size: int = 0, symmetric: bool = False,
                   act_order: bool = False, block_size: int = 128, damp: float = 0.01) -> Compressed:
  """Quantizes w [in, out] to `bits` per weight on min-max grids per output (group_size 0) or per group of
  `group_size` consecutive inputs, minimising the output error on inputs with Hessian h [in, in].

  act_order processes inputs by decreasing Hessian diagonal (most active first); its group grids are then fixed up
  front on the original weights ("static groups"), so storage stays in plain input order. Without act_order, group
  grids are found on the error-updated weights as each group starts, as in the paper."""
  k = w.shape[0]
  _check(bits, group_size, k)
  if group_size:
    block_size = group_size * max(1, block_size // group_size)  # groups must not straddle blocks
  perm = jnp.argsort(-jnp.diag(h)) if act_order else jnp.arange(k)
  inv = jnp.argsort(perm)
  u, dead = obs.inverse_hessian_factor(h[perm][:, perm], damp)
  wt = jnp.where(dead[None, :], 0.0, w.astype(jnp.float32).T[:, perm])  # [out, in] in processing order
  if group_size and not act_order:
    res = obs.sweep(wt, u, block_size=block_size, bits=bits, symmetric=symmetric, group_size=group_size)
    scale, zero = res.scale, res.zero  # [out, groups], groups in input order
  else:
    scale, zero = quantizer.group_grids(wt[:, inv], bits, symmetric, group_size)  # [out, groups], input order
    size = group_size or k
    group_of_column = perm // size
    res = obs.sweep(wt, u, block_size=block_size, bits=bits, symmetric=symmetric,
                    static_scale=scale[:, group_of_column], static_zero=zero[:, group_of_column])
  weight = res.weights[:, inv].T
  size = group_size or k
  scale, zero = scale.T, zero.T  # [groups, out]
  codes = quantizer.codes(weight, jnp.repeat(scale, size, 0), jnp.repeat(zero, size, 0), bits)
  return Compressed(weight, bits=bits, group_size=group_size, codes=codes, scale=scale, zero=zero,
                    loss=float(res.loss.sum()))


def rtn_layer(w: jax.Array, *, bits: int, group_size: int = 0, symmetric: bool = False) -> Compressed:
  """Baseline: round each weight of w [in, out] to the nearest point of the same grids as `quantize_layer`."""
  _check(bits, group_size, w.shape[0])
  q, scale, zero = quantizer.round_to_nearest(w.astype(jnp.float32).T, bits, symmetric, group_size)
  size = group_size or w.shape[0]
  scale, zero = scale.T, zero.T
  weight = q.T
  codes = quantizer.codes(weight, jnp.repeat(scale, size, 0), jnp.repeat(zero, size, 0), bits)
  return Compressed(weight, bits=bits, group_size=group_size, codes=codes, scale=scale, zero=zero)
