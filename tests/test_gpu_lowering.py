"""Every Pallas kernel lowers to Triton for CUDA, checked from the CPU host through `jax.export` (no GPU needed).

This catches what interpret mode cannot: primitives the Triton lowering lacks, tiles that are not powers of two, and
kernels that would fall through to another GPU backend. Compiling the Triton IR to PTX still needs a GPU
(`scripts/gpu_check.sh`).
"""

import contextlib

import jax
import jax.numpy as jnp
import pytest
from jax import export

from model.kernels import int8_matmul as q8
from model.kernels.decode_attention import decode_attention
from model.kernels.flash_attention import flash_attention
from model.kernels.paged_attention import paged_decode_attention
from model.kernels.ternary_matvec import ternary_matvec

S = jax.ShapeDtypeStruct
TRITON = "__gpu$xla.gpu.triton"


def _gpu_target():
  """Where jax wants to be told which GPU it lowers for (from jax 0.12: an abstract device on the abstract mesh, as
  there is no GPU to ask), an H100; a no-op context on older jax, which lowers without one."""
  if not hasattr(jax.sharding, "AbstractDevice"):
    return contextlib.nullcontext()
  h100 = jax.sharding.AbstractDevice(device_kind="NVIDIA H100", num_cores=None, platform="gpu")
  return jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((1,), ("x",), abstract_device=h100))


def _triton_calls(fn, *args) -> int:
  with _gpu_target():
    exported = export.export(jax.jit(fn), platforms=["cuda"],
                             disabled_checks=[export.DisabledSafetyCheck.custom_call(TRITON)])(*args)
  return exported.mlir_module().count(TRITON)


def _grad(fn):
  return jax.grad(lambda *a: fn(*a).astype(jnp.float32).sum(), argnums=(0, 1, 2))


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_flash_attention_forward_and_backward_lower_to_triton(dtype):
  q, kv, seg = S((2, 200, 4, 64), dtype), S((2, 200, 2, 64), dtype), S((2, 200), jnp.int32)
  assert _triton_calls(lambda q, k, v: flash_attention(q, k, v, interpret=False), q, kv, kv) == 1
  packed = _grad(lambda q, k, v, s: flash_attention(q, k, v, segment_ids=s, interpret=False))
  assert _triton_calls(packed, q, kv, kv, seg) == 3  # forward, dK/dV, dQ
  full = _grad(lambda q, k, v: flash_attention(q, k, v, causal=False, interpret=False))
  assert _triton_calls(full, q, kv, kv) == 3


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_decode_attention_lowers_to_triton(dtype):
  cache = S((3, 100, 2, 64), dtype)
  lengths = S((3,), jnp.int32)
  fn = lambda q, k, v, s, e: decode_attention(q, k, v, s, e, interpret=False)  # noqa: E731
  assert _triton_calls(fn, S((3, 8, 64), dtype), cache, cache, lengths, lengths) == 1


def test_paged_decode_attention_lowers_to_triton():
  pages = S((20, 16, 2, 64), jnp.bfloat16)
  fn = lambda q, k, v, t, n: paged_decode_attention(q, k, v, t, n, interpret=False)  # noqa: E731
  assert _triton_calls(fn, S((3, 8, 64), jnp.bfloat16), pages, pages, S((3, 6), jnp.int32), S((3,), jnp.int32)) == 1


def test_int8_matmuls_lower_to_triton():
  per_channel = lambda x, w, s: q8.w8a16_matmul(x, w, s, interpret=False)  # noqa: E731
  assert _triton_calls(per_channel, S((3, 300), jnp.bfloat16), S((300, 500), jnp.int8), S((500,), jnp.float32)) == 1
  grouped = lambda x, w, s: q8.w8a16_matmul(x, w, s, group=64, interpret=False)  # noqa: E731
  assert _triton_calls(grouped, S((3, 256), jnp.float32), S((256, 500), jnp.int8), S((4, 500), jnp.float32)) == 1
  w8a8 = lambda x, xs, w, ws: q8.w8a8_matmul(x, xs, w, ws, interpret=False)  # noqa: E731
  assert _triton_calls(w8a8, S((5, 300), jnp.int8), S((5,), jnp.float32), S((300, 500), jnp.int8),
                       S((500,), jnp.float32)) == 1


def test_ternary_matvec_lowers_to_triton():
  fn = lambda x, c, o, e, n, lo, hi: ternary_matvec(x, c, o, e, n, lo, hi, interpret=False)  # noqa: E731
  i32 = jnp.int32
  assert _triton_calls(fn, S((1, 96), jnp.float32), S((500,), i32), S((33,), i32), S((64, 5), i32), S((64,), i32),
                       S((32,), jnp.float32), S((32,), jnp.float32)) == 1
