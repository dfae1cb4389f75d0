"""Model behaviour: masking, segments, KV-cache parity, scan/unroll/remat equivalence, parameter and FLOP counts."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import base, case_study, gpt2_124m, llama_1b, tiny
from model import flops
from model import transformer as T


def small_spec(family="gpt", **kw):
  c = tiny.get_config()
  c.model.update(family=family, num_layers=2, embed_dim=32, num_heads=4, max_len=32, vocab_size=97)
  c.data.seq_len = 32
  if family == "llama":
    c.model.num_kv_heads = 2
  for k, v in kw.items():
    c.model[k] = v
  base.validate(c)
  return T.ModelSpec.from_config(c.model)


def make(spec, seed=0):
  return T.Transformer(spec, rngs=nnx.Rngs(params=seed))


@nnx.jit
def forward(model, *args):
  return model(*args)


@nnx.jit
def extend(model, *args):
  return model.extend(*args)


def tokens(key, shape, vocab=97):
  return jax.random.randint(jax.random.key(key), shape, 0, vocab, dtype=jnp.int32)


@pytest.mark.parametrize("family", ["gpt", "llama"])
def test_changing_a_future_token_never_changes_earlier_logits(family):
  model = make(small_spec(family))
  x = tokens(1, (2, 16))
  y = x.at[:, 9].set((x[:, 9] + 1) % 97)
  a, b = forward(model, x), forward(model, y)
  np.testing.assert_array_equal(np.asarray(a[:, :9]), np.asarray(b[:, :9]))
  assert not np.allclose(a[:, 9:], b[:, 9:])


@pytest.mark.parametrize("family", ["gpt", "llama"])
def test_packed_segments_match_separate_documents(family):
  model = make(small_spec(family))
  doc_a, doc_b = tokens(2, (1, 7)), tokens(3, (1, 5))
  packed = jnp.concatenate([doc_a, doc_b, jnp.zeros((1, 4), jnp.int32)], axis=1)
  segments = jnp.array([[1] * 7 + [2] * 5 + [0] * 4], jnp.int32)
  positions = jnp.array([list(range(7)) + list(range(5)) + [0] * 4], jnp.int32)
  out = forward(model, packed, positions, segments)
  np.testing.assert_allclose(out[:, :7], forward(model, doc_a), atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(out[:, 7:12], forward(model, doc_b), atol=1e-5, rtol=1e-5)
  assert np.isfinite(np.asarray(out)).all()  # padding rows attend to nothing and must not produce NaN


@pytest.mark.parametrize("family", ["gpt", "llama"])
def test_kv_cache_prefill_and_decode_match_full_forward(family):
  model = make(small_spec(family))
  x = tokens(4, (2, 12))
  full = forward(model, x)
  cache = model.init_cache(2, 16)
  pos = jnp.broadcast_to(jnp.arange(12, dtype=jnp.int32), (2, 12))
  seg = jnp.ones((2, 12), jnp.int32)
  logits, cache = extend(model, x[:, :8], pos[:, :8], seg[:, :8], cache)
  steps = [logits]
  for t in range(8, 12):
    logits, cache = extend(model, x[:, t:t + 1], pos[:, t:t + 1], seg[:, t:t + 1], cache)
    steps.append(logits)
  np.testing.assert_allclose(jnp.concatenate(steps, axis=1), full, atol=1e-5, rtol=1e-5)
  assert int(cache["index"]) == 12


def test_left_padded_prompts_in_cache_match_unpadded_forward():
  model = make(small_spec("llama"))
  short = tokens(5, (1, 5))
  cache = model.init_cache(1, 12)
  padded = jnp.concatenate([jnp.zeros((1, 3), jnp.int32), short], axis=1)
  seg = jnp.array([[0, 0, 0, 1, 1, 1, 1, 1]], jnp.int32)
  pos = jnp.array([[0, 0, 0, 0, 1, 2, 3, 4]], jnp.int32)
  logits, _ = extend(model, padded, pos, seg, cache)
  np.testing.assert_allclose(logits[:, 3:], forward(model, short), atol=1e-5, rtol=1e-5)


def _loss_and_grads(spec, params, x):
  graphdef = nnx.split(make(spec))[0]

  def loss(p):
    return jnp.mean(jnp.square(nnx.merge(graphdef, p)(x)))

  return jax.value_and_grad(loss)(params)


@pytest.mark.parametrize("remat", ["full", "save_dots", "save_attention_out"])
def test_scan_unroll_and_remat_policies_give_the_same_loss_and_gradients(remat):
  reference = small_spec("llama")
  params = nnx.to_pure_dict(nnx.state(make(reference), nnx.Param))
  x = tokens(6, (2, 10))
  ref_loss, ref_grads = jax.jit(lambda p: _loss_and_grads(reference, p, x))(params)
  for scan in (True, False):
    spec = dataclasses.replace(reference, remat=remat, scan_layers=scan)
    loss, grads = jax.jit(lambda p: _loss_and_grads(spec, p, x))(params)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-4), grads, ref_grads)


def test_bfloat16_compute_stays_close_to_float32():
  spec = small_spec("gpt")
  params = nnx.to_pure_dict(nnx.state(make(spec), nnx.Param))
  x = tokens(7, (2, 16))
  f32 = forward(nnx.merge(nnx.split(make(spec))[0], params), x)
  bf16_spec = dataclasses.replace(spec, dtype="bfloat16")
  bf16 = forward(nnx.merge(nnx.split(make(bf16_spec))[0], params), x)
  assert bf16.dtype == jnp.float32  # logits are always float32
  np.testing.assert_allclose(bf16, f32, atol=0.05)


@pytest.mark.parametrize("kw", [
    dict(family="gpt"), dict(family="gpt", tie_embeddings=False), dict(family="llama"),
    dict(family="llama", use_bias=1, tie_embeddings=False, mlp_dim=48), dict(family="gpt", head_dim=12),
    dict(family="llama", mlp_bias=True), dict(family="gpt", norm_position="post", embed_proj_dim=16),
    dict(family="gpt", norm_position="post", embed_proj_dim=16, tie_embeddings=False),
])
def test_parameter_and_flop_counts_match_the_parameter_tree(kw):
  spec = small_spec(**kw)
  model = make(spec)
  assert flops.param_count(spec) == flops.tree_param_count(model)
  state = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  matmul = sum(v.size for path, v in jax.tree_util.tree_leaves_with_path(state)
               if str(path[-1].key).startswith("w") or path[-1].key in ("head", "project_in", "project_out"))
  matmul += 0 if "head" in state else state["embed"].size
  assert flops.matmul_param_count(spec) == matmul
  fwd = flops.flops_per_token(spec, 16, training=False)
  assert fwd == 2 * matmul + 4 * spec.num_layers * spec.num_heads * spec.head_dim * 16
  assert flops.flops_per_token(spec, 16) == 3 * fwd


@pytest.mark.parametrize("preset,expected", [(gpt2_124m, 124_439_808), (llama_1b, 1_235_814_400),
                                             (case_study, 1_334_016)])
def test_presets_build_abstractly_with_their_parameter_counts(preset, expected):
  cfg = base.validate(preset.get_config())
  abstract = T.abstract_model(T.ModelSpec.from_config(cfg.model))
  assert flops.tree_param_count(abstract) == expected
  assert flops.param_count(T.ModelSpec.from_config(cfg.model)) == expected


def test_parameters_carry_logical_axis_names():
  model = make(small_spec("llama"))
  state = nnx.state(model, nnx.Param)
  leaves = jax.tree_util.tree_leaves_with_path(state, is_leaf=lambda v: isinstance(v, nnx.Variable))
  for path, var in leaves:
    names = var.get_metadata()["logical_axes"]
    assert len(names) == var[...].ndim, (path, names)
  assert model.blocks.attn.wq.get_metadata()["logical_axes"] == ("layers", "embed", "heads", "head_dim")


def test_unstacked_model_matches_the_stacked_one_for_forward_and_cache_steps():
  model = make(small_spec("llama"))
  flat = model.unstacked()
  assert isinstance(flat.blocks, nnx.List) and len(flat.blocks) == 2
  x = tokens(8, (2, 10))
  np.testing.assert_allclose(forward(flat, x), forward(model, x), atol=1e-6)
  pos = jnp.broadcast_to(jnp.arange(10, dtype=jnp.int32), (2, 10))
  seg = jnp.ones((2, 10), jnp.int32)
  (a, cache_a), (b, cache_b) = (extend(m, x, pos, seg, m.init_cache(2, 12)) for m in (model, flat))
  np.testing.assert_allclose(a, b, atol=1e-6)
  jax.tree.map(lambda u, v: np.testing.assert_allclose(u, v, atol=1e-6), cache_a, cache_b)


@pytest.mark.parametrize("native", [False, True])
@pytest.mark.parametrize("dtype, kv_heads", [(jnp.float32, 2), (jnp.float32, 4), (jnp.bfloat16, 1)])
def test_self_attention_backward_matches_autodiff_of_the_reference(native, dtype, kv_heads):
  """attention.xla_self_attention (hand-written backward; with `native`, batched matmuls on the CPU kernel) against
  autodiff of attention.xla_attention: outputs and q/k/v gradients, GQA, packed segments and padding rows."""
  from model import attention
  from model.kernels import cpu_native
  if native and cpu_native.unavailable_reason():
    pytest.skip(cpu_native.unavailable_reason())
  b, l, h, d = 2, 64, 4, 32
  keys = jax.random.split(jax.random.PRNGKey(3), 4)
  q = jax.random.normal(keys[0], (b, l, h, d), dtype)
  k, v = (jax.random.normal(key, (b, l, kv_heads, d), dtype) for key in keys[1:3])
  cotangent = jax.random.normal(keys[3], (b, l, h, d), jnp.float32)
  segments = jnp.ones((b, l), jnp.int32).at[:, 20:].set(2).at[0, -7:].set(0)  # two documents, then padding
  visibility = attention.Visibility.causal_self(segments)

  def loss_and_grads(fn):
    loss = lambda q, k, v: (fn(q, k, v, visibility, d ** -0.5).astype(jnp.float32) * cotangent).sum()  # noqa: E731
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))(q, k, v)

  want, want_grads = loss_and_grads(attention.xla_attention)
  got, got_grads = loss_and_grads(lambda *a: attention.xla_self_attention(*a, native=native))
  tol = 1e-5 if dtype == jnp.float32 else 2e-2
  np.testing.assert_allclose(float(got), float(want), rtol=tol)
  for g, w in zip(got_grads, want_grads):
    scale = float(jnp.abs(w.astype(jnp.float32)).max())
    np.testing.assert_allclose(np.asarray(g, np.float32) / scale, np.asarray(w, np.float32) / scale, atol=tol)
