"""Matmuls with low-precision operands and float32 everything else (`model.matmul_dtype`), forward and backward.

PyTorch's autocast runs the matmuls of both passes with bfloat16 operands while activations, norms and the optimizer
stay float32. On CPUs with bf16 dot units (AVX512-BF16, AMX) that doubles the matmul rate without paying for slow
bf16 elementwise work (`model.dtype=bfloat16` makes every activation bf16). JAX's own transpose of a bf16 dot with a
float32 result would run the two backward dots on a float32 cotangent, at the float32 rate; `matmul` here casts the
cotangent to the operand dtype too, so all three dots of a linear layer run in it, each accumulating in float32.

x [M, K] (any float dtype) @ w [K, N] (or [N, K] with `w_transposed`) -> [M, N] float32; gradients come back in x's
and w's own dtypes.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def _dot(a, b, contract_a: int, contract_b: int) -> jax.Array:
  return jax.lax.dot_general(a, b, (((contract_a,), (contract_b,)), ((), ())), preferred_element_type=jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def matmul(x: jax.Array, w: jax.Array, dtype: str, w_transposed: bool = False) -> jax.Array:
  """x [M, K] @ w [K, N] (w [N, K] when `w_transposed`) with both operands cast to `dtype`: [M, N] float32."""
  return _dot(x.astype(dtype), w.astype(dtype), 1, 1 if w_transposed else 0)


def _matmul_fwd(x, w, dtype, w_transposed):
  xl, wl = x.astype(dtype), w.astype(dtype)
  # Zero-size arrays carry the operands' own dtypes to the backward pass (residuals must be arrays).
  return _dot(xl, wl, 1, 1 if w_transposed else 0), (xl, wl, jnp.zeros((0,), x.dtype), jnp.zeros((0,), w.dtype))


def _matmul_bwd(dtype, w_transposed, residuals, ct):
  xl, wl, x_kind, w_kind = residuals
  ctl = ct.astype(dtype)  # [M, N]
  dx = _dot(ctl, wl, 1, 0 if w_transposed else 1)  # [M, K]
  dw = _dot(ctl, xl, 0, 0) if w_transposed else _dot(xl, ctl, 0, 0)  # [N, K] or [K, N]
  return dx.astype(x_kind.dtype), dw.astype(w_kind.dtype)


matmul.defvjp(_matmul_fwd, _matmul_bwd)
