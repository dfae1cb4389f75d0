"""Pallas flash attention (interpret mode on CPU, compiled on GPU) against the plain-jnp reference: forward, all three gradients,
GQA, segments, odd lengths, odd head dims, bf16; the model's `pallas` switch against `xla`; no [L, L] intermediates.

Tolerances: float32 max abs error 2e-5 (outputs and gradients are O(1)); bfloat16 5e-2 (8-bit mantissa inputs).
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from model.kernels import flash_attention as flash_attention_lib
from model.kernels.flash_attention import flash_attention, reference_attention
from model.transformer import ModelSpec, Transformer

TOL = {jnp.float32: 2e-5, jnp.bfloat16: 5e-2}


def inputs(seed, b, l, h, kv, d, dtype):
  ks = jax.random.split(jax.random.key(seed), 4)
  q = jax.random.normal(ks[0], (b, l, h, d), jnp.float32).astype(dtype)
  k = jax.random.normal(ks[1], (b, l, kv, d), jnp.float32).astype(dtype)
  v = jax.random.normal(ks[2], (b, l, kv, d), jnp.float32).astype(dtype)
  cot = jax.random.normal(ks[3], (b, l, h, d), jnp.float32)
  return q, k, v, cot


def random_segments(seed, b, l):
  """Sorted segment ids 1..4 per row (packed documents), different cut points per row."""
  rng = np.random.default_rng(seed)
  cuts = np.sort(rng.integers(1, l, (b, 3)), axis=1)
  return jnp.asarray(1 + (np.arange(l)[None, :, None] >= cuts[:, None, :]).sum(-1), jnp.int32)


def value_and_grads(fn, q, k, v, cot):
  out, vjp = jax.vjp(fn, q, k, v)
  return (out, *vjp(cot.astype(out.dtype)))


CASES = [  # (b, l, h, kv, d, causal, segments, block_q, block_k, dtype)
    (2, 50, 4, 2, 16, True, False, 16, 32, jnp.float32),  # GQA, length not a multiple of either block
    (1, 64, 2, 2, 32, False, False, 32, 16, jnp.float32),  # MHA, not causal
    (2, 70, 4, 1, 24, True, True, 32, 32, jnp.float32),  # MQA, segments, head dim padded 24 -> 32
    (2, 40, 4, 2, 16, False, True, 16, 16, jnp.float32),  # segments without causality
    (1, 48, 4, 2, 32, True, True, 16, 16, jnp.bfloat16),  # bf16 inputs
]


@pytest.mark.parametrize("b,l,h,kv,d,causal,segments,block_q,block_k,dtype", CASES)
def test_forward_and_gradients_match_the_reference(b, l, h, kv, d, causal, segments, block_q, block_k, dtype):
  q, k, v, cot = inputs(l + d, b, l, h, kv, d, dtype)
  seg = random_segments(l, b, l) if segments else None
  kernel = lambda q, k, v: flash_attention(q, k, v, causal=causal, segment_ids=seg, block_q=block_q,  # noqa: E731
                                           block_k=block_k)
  reference = lambda q, k, v: reference_attention(q, k, v, causal=causal, segment_ids=seg)  # noqa: E731
  got = jax.jit(lambda *a: value_and_grads(kernel, *a))(q, k, v, cot)
  want = jax.jit(lambda *a: value_and_grads(reference, *a))(q, k, v, cot)
  for name, a, w in zip(("out", "dq", "dk", "dv"), got, want):
    assert a.shape == w.shape and a.dtype == w.dtype, name
    np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(w, np.float32), atol=TOL[dtype], rtol=0,
                               err_msg=name)


def test_no_length_by_length_array_outside_the_kernels():
  l = 96
  q, k, v, cot = inputs(0, 1, l, 2, 2, 16, jnp.float32)
  fn = lambda q, k, v: flash_attention(q, k, v, block_q=16, block_k=16, interpret=True)  # noqa: E731
  jaxpr = jax.make_jaxpr(lambda *a: value_and_grads(fn, *a))(q, k, v, cot)

  def sub_jaxprs(eqn):
    for value in eqn.params.values():
      for item in value if isinstance(value, (tuple, list)) else (value,):
        inner = getattr(item, "jaxpr", item)  # ClosedJaxpr -> Jaxpr
        if hasattr(inner, "eqns"):
          yield inner

  def shapes(jxpr):
    for eqn in jxpr.eqns:
      if eqn.primitive.name == "pallas_call":
        continue  # inside the kernels only [block, block] tiles exist
      for var in eqn.outvars:
        yield eqn.primitive.name, var.aval.shape
      for inner in sub_jaxprs(eqn):
        yield from shapes(inner)

  seen = list(shapes(jaxpr.jaxpr))
  assert any(name == "dot_general" for name, _ in seen)  # the walk reached real computations
  assert not [(n, s) for n, s in seen if sum(dim >= l for dim in s) >= 2]
  # the same walk does flag the reference implementation's [L, L] scores
  ref = jax.make_jaxpr(lambda *a: value_and_grads(reference_attention, *a))(q, k, v, cot)
  assert [(n, s) for n, s in shapes(ref.jaxpr) if sum(dim >= l for dim in s) >= 2]


def test_bad_arguments_are_rejected_with_clear_messages():
  q, k, v, _ = inputs(1, 1, 32, 4, 3, 16, jnp.float32)
  with pytest.raises(ValueError, match="kv heads dividing query heads"):
    flash_attention(q, k, v)
  q, k, v, _ = inputs(1, 1, 32, 4, 2, 16, jnp.float32)
  with pytest.raises(ValueError, match="block_q=24 must be a power of two"):
    flash_attention(q, k, v, block_q=24)
  with pytest.raises(ValueError, match="segment_ids shape"):
    flash_attention(q, k, v, segment_ids=jnp.ones((1, 31), jnp.int32))


@pytest.mark.parametrize("family", ["gpt", "llama"])
def test_model_with_pallas_attention_matches_xla(family):
  spec = ModelSpec(family=family, vocab_size=64, num_layers=2, embed_dim=32, num_heads=4,
                   num_kv_heads=2 if family == "llama" else 4, head_dim=8, mlp_dim=64, max_len=48,
                   use_bias=family == "gpt")
  params = nnx.to_pure_dict(nnx.state(Transformer(spec, rngs=nnx.Rngs(params=0)), nnx.Param))
  rng = np.random.default_rng(0)
  tokens = jnp.asarray(rng.integers(0, 64, (2, 40)), jnp.int32)
  segments = np.array(random_segments(1, 2, 40))
  segments[:, -5:] = 0  # trailing padding
  positions = jnp.asarray([np.concatenate([np.arange(n) for n in np.unique(r, return_counts=True)[1]])
                           for r in segments], jnp.int32)
  segments = jnp.asarray(segments)
  real = np.asarray(segments) > 0

  def loss_and_logits(impl, p):
    model = nnx.merge(nnx.split(Transformer(dataclasses.replace(spec, attention_impl=impl),
                                            rngs=nnx.Rngs(params=0)))[0], p)
    logits = model(tokens, positions, segments)
    loss = jnp.sum(jax.nn.logsumexp(logits, -1) * real)
    return loss, logits

  (l_xla, lg_xla), g_xla = jax.jit(jax.value_and_grad(lambda p: loss_and_logits("xla", p), has_aux=True))(params)
  (l_pal, lg_pal), g_pal = jax.jit(jax.value_and_grad(lambda p: loss_and_logits("pallas", p), has_aux=True))(params)
  np.testing.assert_allclose(np.asarray(lg_pal)[real], np.asarray(lg_xla)[real], atol=1e-5)
  np.testing.assert_allclose(float(l_pal), float(l_xla), rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4), g_pal, g_xla)


def test_the_tpu_path_matches_the_reference_in_tpu_interpret_mode():
  """JAX's Mosaic TPU kernel behind `flash_attention` on TPU (`_tpu_flash_attention`: layout, GQA, padding to the
  TPU block, segments), run by Pallas's TPU interpreter on this CPU: forward and all three gradients."""
  from jax.experimental.pallas import tpu as pltpu

  b, l, h, kv, d = 1, 130, 4, 2, 32  # padded to 256: two TPU blocks, the second mostly padding
  q, k, v, cot = inputs(7, b, l, h, kv, d, jnp.float32)
  seg = random_segments(3, b, l)
  kernel = lambda q, k, v: flash_attention_lib._tpu_flash_attention(q, k, v, seg, causal=True,  # noqa: E731
                                                                    sm_scale=d**-0.5)
  with pltpu.force_tpu_interpret_mode():
    got = value_and_grads(kernel, q, k, v, cot)
  want = value_and_grads(lambda q, k, v: reference_attention(q, k, v, segment_ids=seg), q, k, v, cot)
  for name, a, w in zip(("out", "dq", "dk", "dv"), got, want):
    np.testing.assert_allclose(np.asarray(a), np.asarray(w), atol=TOL[jnp.float32], rtol=0, err_msg=name)


def test_the_kernel_runs_per_shard_on_a_mesh_and_matches_one_device():
  """XLA cannot partition a kernel's custom call, so under a mesh `attention.per_shard` runs it in `jax.shard_map`:
  rows split over data, heads over tensor (GQA groups kept whole). Forward and gradients equal the reference."""
  from model import attention

  mesh = jax.make_mesh((4, 2), ("data", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
  b, l, h, kv, d = 4, 32, 4, 2, 16
  q, k, v, cot = inputs(11, b, l, h, kv, d, jnp.float32)
  seg = random_segments(5, b, l)
  kernel = lambda q, k, v: attention.pallas_attention(q, k, v, attention.Visibility.causal_self(seg),  # noqa: E731
                                                      d**-0.5)
  with jax.set_mesh(mesh):
    assert "shard_map" in str(jax.make_jaxpr(kernel)(q, k, v))
    got = jax.jit(lambda *a: value_and_grads(kernel, *a))(q, k, v, cot)
  want = value_and_grads(lambda q, k, v: reference_attention(q, k, v, segment_ids=seg), q, k, v, cot)
  for name, a, w in zip(("out", "dq", "dk", "dv"), got, want):
    np.testing.assert_allclose(np.asarray(a), np.asarray(w), atol=TOL[jnp.float32], rtol=0, err_msg=name)
