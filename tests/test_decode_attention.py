"""Pallas decode attention (interpret mode on CPU, compiled on GPU) against the jnp reference for ragged batches, and
greedy generation through the `pallas` switch against `xla`.

Tolerances: float32 max abs error 2e-5; bfloat16 3e-2.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from infer import generate
from model.kernels.decode_attention import decode_attention, reference_decode_attention
from model.transformer import ModelSpec, Transformer


@pytest.mark.parametrize("b,s,h,kv,d,block_k,dtype,tol", [
    (4, 70, 8, 2, 16, 16, jnp.float32, 2e-5),  # GQA, cache length not a multiple of the block
    (3, 64, 4, 4, 32, 32, jnp.float32, 2e-5),  # MHA
    (3, 40, 6, 1, 24, 16, jnp.bfloat16, 3e-2),  # MQA, head dim padded, bf16
])
def test_ragged_decode_matches_the_reference(b, s, h, kv, d, block_k, dtype, tol):
  ks = jax.random.split(jax.random.key(s + d), 3)
  q = jax.random.normal(ks[0], (b, h, d), jnp.float32).astype(dtype)
  k = jax.random.normal(ks[1], (b, s, kv, d), jnp.float32).astype(dtype)
  v = jax.random.normal(ks[2], (b, s, kv, d), jnp.float32).astype(dtype)
  rng = np.random.default_rng(b)
  starts = rng.integers(0, s // 2, b)
  ends = np.minimum(s, starts + rng.integers(1, s, b))
  starts[0], ends[0] = 0, s  # one full row
  if b > 2:
    ends[-1] = starts[-1]  # one empty row: zeros, not NaN
  starts, ends = jnp.asarray(starts, jnp.int32), jnp.asarray(ends, jnp.int32)
  got = decode_attention(q, k, v, starts, ends, block_k=block_k)
  want = reference_decode_attention(q, k, v, starts, ends)
  assert got.shape == (b, h, d) and got.dtype == dtype
  np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), atol=tol, rtol=0)
  if b > 2:
    assert not np.asarray(got[-1]).any()


def test_bad_cache_shapes_are_rejected():
  q = jnp.zeros((2, 4, 16))
  with pytest.raises(ValueError, match="kv heads dividing query heads"):
    decode_attention(q, jnp.zeros((2, 8, 3, 16)), jnp.zeros((2, 8, 3, 16)), jnp.zeros(2, jnp.int32),
                     jnp.ones(2, jnp.int32))
  with pytest.raises(ValueError, match="starts"):
    decode_attention(q, jnp.zeros((2, 8, 2, 16)), jnp.zeros((2, 8, 2, 16)), jnp.zeros(3, jnp.int32),
                     jnp.ones(2, jnp.int32))


def test_generation_with_pallas_attention_matches_xla():
  spec = ModelSpec(family="llama", vocab_size=64, num_layers=2, embed_dim=32, num_heads=4, num_kv_heads=2,
                   head_dim=8, mlp_dim=64, max_len=40, use_bias=False)
  params = nnx.to_pure_dict(nnx.state(Transformer(spec, rngs=nnx.Rngs(params=3)), nnx.Param))
  params = jax.tree.map(lambda x: x * 8.0 if x.ndim > 2 else x, params)  # peaked logits: no argmax near-ties
  prompts = [[1, 5, 9, 2, 7, 3], [4, 4], [8, 1, 6, 2]]
  outputs = {}
  for impl in ("xla", "pallas"):
    graphdef = nnx.split(Transformer(dataclasses.replace(spec, attention_impl=impl), rngs=nnx.Rngs(params=0)))[0]
    outputs[impl] = generate.generate(nnx.merge(graphdef, params), prompts, max_new_tokens=10)
  assert outputs["pallas"] == outputs["xla"]
  assert len({tuple(o) for o in outputs["xla"]}) > 1  # rows really differ
