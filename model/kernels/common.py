"""Helpers the Pallas kernels share: the masking constant, the float32-accumulating dot, padding, the online-softmax
step of the decode and paged kernels, and the compiler parameters of compiled GPU kernels."""

from __future__ import annotations

import jax
import jax.numpy as jnp

NEG_INF = -0.7 * float(jnp.finfo(jnp.float32).max)  # finite: rows with no visible key stay NaN-free


def dot(a, b, contract_a: int, contract_b: int):
  """2-D matmul contracting a's axis `contract_a` with b's axis `contract_b`, float32 accumulation.

  float32 operands use full IEEE precision (Triton would otherwise pick TF32); use bfloat16 inputs for speed."""
  precision = jax.lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
  return jax.lax.dot_general(a, b, (((contract_a,), (contract_b,)), ((), ())), precision=precision,
                             preferred_element_type=jnp.float32)


def pad_axis(x, axis: int, size: int):
  """x zero-padded along `axis` to `size` (returned as is when already that long)."""
  if x.shape[axis] == size:
    return x
  pad = [(0, 0)] * x.ndim
  pad[axis] = (0, size - x.shape[axis])
  return jnp.pad(x, pad)


def compiler_params(interpret: bool):
  """Triton compiler params for compiled GPU kernels (also when lowering for CUDA from a CPU host via jax.export);
  None in interpret mode and on TPU (Mosaic takes its defaults)."""
  if interpret or jax.default_backend() == "tpu":
    return None
  from jax.experimental.pallas import triton as plgpu  # GPU-only backend module, loaded when a GPU kernel is built

  return plgpu.CompilerParams(num_warps=4, num_stages=2)


def online_softmax_init(g: int, d: int):
  """Empty (accumulator [G, D], running max [G], running sum [G]) for `online_softmax_step`."""
  return jnp.zeros((g, d), jnp.float32), jnp.full((g,), NEG_INF, jnp.float32), jnp.zeros((g,), jnp.float32)


def online_softmax_step(carry, q, k, v, valid, sm_scale):
  """Folds one key block into the running softmax of q [G, D] against k, v [N, D] (valid [G, N] bool)."""
  acc, m, l = carry
  s = jnp.where(valid, dot(q, k, 1, 1) * sm_scale, NEG_INF)
  m_new = jnp.maximum(m, s.max(axis=1))
  p = jnp.where(valid, jnp.exp(s - m_new[:, None]), 0.0)
  alpha = jnp.exp(m - m_new)
  return acc * alpha[:, None] + dot(p.astype(v.dtype), v, 1, 0), m_new, l * alpha + p.sum(axis=1)


def online_softmax_finish(carry):
  """acc / sum, with zeros for rows that saw no valid key."""
  acc, _, l = carry
  return acc / jnp.where(l == 0.0, 1.0, l)[:, None]
