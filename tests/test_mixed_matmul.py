"""model.matmul_dtype: linear layers with bfloat16 operands in both passes and float32 everything else."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from model import mixed_matmul
from test_step import random_batch, run_steps, small_config


def _bf16(a):
  return a.astype(jnp.bfloat16).astype(jnp.float32)


@pytest.mark.parametrize("transposed", [False, True])
def test_all_three_dots_use_bf16_operands_with_float32_accumulation(transposed):
  """Forward, and both gradients, equal float32 dots of the bf16-rounded operands and cotangent."""
  x = jax.random.normal(jax.random.key(0), (24, 40), jnp.float32)
  w = jax.random.normal(jax.random.key(1), (40, 16), jnp.float32)
  ct = jax.random.normal(jax.random.key(2), (24, 16), jnp.float32)
  w_in = w.T if transposed else w
  y, pullback = jax.vjp(lambda a, b: mixed_matmul.matmul(a, b, "bfloat16", transposed), x, w_in)
  dx, dw = pullback(ct)
  hi = jax.lax.Precision.HIGHEST
  np.testing.assert_allclose(y, jnp.dot(_bf16(x), _bf16(w), precision=hi), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(dx, jnp.dot(_bf16(ct), _bf16(w).T, precision=hi), rtol=1e-5, atol=1e-5)
  want_dw = jnp.dot(_bf16(x).T, _bf16(ct), precision=hi)
  np.testing.assert_allclose(dw, want_dw.T if transposed else want_dw, rtol=1e-5, atol=1e-5)
  assert y.dtype == dx.dtype == dw.dtype == jnp.float32
  # and the rounding is real: the float32 product differs from the bf16 one
  assert float(jnp.abs(y - jnp.dot(x, w, precision=hi)).max()) > 1e-3


@pytest.mark.parametrize("tie", [True, False])
def test_bf16_matmuls_train_like_float32_within_bf16_rounding(tie):
  batches = [random_batch(0)] * 8  # one batch, so the loss must fall
  ref_config = small_config()
  ref_config.model.tie_embeddings = tie
  mixed_config = small_config()
  mixed_config.model.update(tie_embeddings=tie, matmul_dtype="bfloat16")
  _, want = run_steps(ref_config, batches)
  _, got = run_steps(mixed_config, batches)
  np.testing.assert_allclose(got, want, rtol=1e-2)
  assert got != want  # the bf16 path really ran
  assert got[-1] < got[0]  # and it learns
