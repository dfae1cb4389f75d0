"""int8 matmul kernels (interpret mode on CPU, compiled on GPU): W8A8 is exact against an integer reference, W8A16
matches dequantise-then-matmul (float32: 1e-4 relative; bfloat16: 2e-2), and quantisation error is bounded."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from model.kernels import int8_matmul as q8


@pytest.mark.parametrize("m,k,n", [(1, 96, 80), (37, 200, 130), (64, 128, 256)])
def test_w8a8_is_exact_against_integer_arithmetic(m, k, n):
  rng = np.random.default_rng(m + k + n)
  x_q = rng.integers(-127, 128, (m, k)).astype(np.int8)
  w_q = rng.integers(-127, 128, (k, n)).astype(np.int8)
  x_scale = rng.uniform(0.01, 0.1, m).astype(np.float32)
  w_scale = rng.uniform(0.01, 0.1, n).astype(np.float32)
  got = np.asarray(q8.w8a8_matmul(jnp.asarray(x_q), jnp.asarray(x_scale), jnp.asarray(w_q), jnp.asarray(w_scale),
                                  block_k=32))
  acc = x_q.astype(np.int64) @ w_q.astype(np.int64)  # exact integers
  assert np.abs(acc).max() < 2**31
  np.testing.assert_array_equal(got, (acc.astype(np.float32) * x_scale[:, None]) * w_scale[None, :])


@pytest.mark.parametrize("m,k,n,group,dtype,tol", [
    (1, 96, 80, 0, jnp.float32, 1e-4), (19, 256, 130, 64, jnp.float32, 1e-4), (8, 128, 64, 0, jnp.bfloat16, 2e-2),
])
def test_w8a16_matches_dequantise_then_matmul(m, k, n, group, dtype, tol):
  kx, kw = jax.random.split(jax.random.key(k + n))
  x = jax.random.normal(kx, (m, k), jnp.float32).astype(dtype)
  w = jax.random.normal(kw, (k, n), jnp.float32) * 0.05
  w_q, w_scale = q8.quantize_per_channel(w, group)
  got = q8.w8a16_matmul(x, w_q, w_scale, group=group, block_k=32)
  want = q8.w8a16_reference(x, w_q, w_scale, group)
  assert got.shape == (m, n) and got.dtype == dtype
  scale = float(jnp.abs(want.astype(jnp.float32)).max())
  np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), atol=tol * scale, rtol=0)
  # and the quantised product stays close to the float product
  exact = np.asarray(x, np.float32) @ np.asarray(w)
  assert np.abs(np.asarray(got, np.float32) - exact).max() < 0.05 * np.abs(exact).max()


def test_quantizers_round_trip_within_half_a_step():
  w = jax.random.normal(jax.random.key(0), (64, 32))
  w_q, s = q8.quantize_per_channel(w)
  assert w_q.dtype == jnp.int8 and int(jnp.abs(w_q).max()) == 127
  assert float(jnp.abs(w_q * s - w).max()) <= float(s.max()) / 2 + 1e-7
  x_q, xs = q8.quantize_per_token(w)
  assert float(jnp.abs(x_q * xs[:, None] - w).max()) <= float(xs.max()) / 2 + 1e-7


def test_bad_operands_are_rejected():
  with pytest.raises(ValueError, match="w_q must be int8"):
    q8.w8a16_matmul(jnp.ones((2, 8)), jnp.ones((8, 4)), jnp.ones(4))
  with pytest.raises(ValueError, match="w_scale shape"):
    q8.w8a16_matmul(jnp.ones((2, 8)), jnp.ones((8, 4), jnp.int8), jnp.ones(3))
  with pytest.raises(ValueError, match="group=32 must divide the input dimension K=40"):
    q8.w8a16_matmul(jnp.ones((2, 40)), jnp.ones((40, 4), jnp.int8), jnp.ones((1, 4)), group=32)
  with pytest.raises(ValueError, match="x_scale"):
    q8.w8a8_matmul(jnp.ones((2, 8), jnp.int8), jnp.ones(3), jnp.ones((8, 4), jnp.int8), jnp.ones(4))
