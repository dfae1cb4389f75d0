"""Native CPU kernels (model/kernels/cpu_native.py) against plain references, and quantized models served through
them: int8 (W8A16, W8A8) and the packed codes of compressed workdirs, in `generate`, `evaluate` and the engine."""

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from model import quant, transformer
from model.kernels import cpu_native
from model.kernels import int8_matmul as q8
from model.transformer import ModelSpec

REASON = cpu_native.unavailable_reason()
SPEC = ModelSpec(family="gpt", vocab_size=256, num_layers=2, embed_dim=64, num_heads=4, num_kv_heads=4, head_dim=16,
                 mlp_dim=128, max_len=64, init_std=0.1)
# CI sets PEAKLLM_REQUIRE_NATIVE=1 so that a missing compiler fails instead of skipping.
pytestmark = pytest.mark.skipif(REASON is not None and not os.environ.get("PEAKLLM_REQUIRE_NATIVE"),
                                reason=f"native kernels unavailable: {REASON}")


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group", [32, 0])
def test_packed_matmul_matches_dequantized_reference(bits, group):
  rng = np.random.default_rng(bits)
  k, n = 128, 192
  g = group or k
  codes = rng.integers(0, 2 ** bits, (k, n)).astype(np.uint8)
  scale = (rng.random((k // g, n)) + 0.5).astype(np.float32)
  zero = rng.integers(0, 2 ** bits, (k // g, n)).astype(np.float32)
  w = np.repeat(scale, g, 0) * (codes.astype(np.float32) - np.repeat(zero, g, 0))
  packed = cpu_native.to_kernel_layout(codes, bits)
  assert packed.nbytes == k * n * bits // 8
  np.testing.assert_array_equal(np.asarray(cpu_native.from_kernel_layout(jnp.asarray(packed), bits, k, n)), codes)
  fn = jax.jit(lambda x, c, s, z: cpu_native.matmul_packed(x, c, s, z, bits))
  for m in (1, 2, 3, 4, 7, 9, 16):
    x = rng.standard_normal((m, k)).astype(np.float32)
    got = np.asarray(fn(x, packed, scale, zero))
    ref = x.astype(np.float64) @ w
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-4 * np.abs(ref).max())


@pytest.mark.parametrize("m, k", [(1, 96), (4, 96), (6, 96), (3, 208), (5, 102)])
def test_int8_kernels_match_references(m, k):
  """k=208 leaves a partial 64-byte block in the VNNI head kernel; k=102 (not a multiple of 4) takes the [k, n]
  kernel's widening path (the head kernels need multiples of 16)."""
  rng = np.random.default_rng(m)
  n = 128
  w = rng.integers(-127, 128, (k, n)).astype(np.int8)
  s = (rng.random(n) + 0.5).astype(np.float32)
  x = rng.standard_normal((m, k)).astype(np.float32)
  ref = (x.astype(np.float64) @ w.astype(np.float64)) * s
  tol = dict(rtol=1e-5, atol=1e-6 * np.abs(ref).max())
  head = k % 16 == 0
  np.testing.assert_allclose(np.asarray(jax.jit(cpu_native.matmul_kn)(x, w, s)), ref, **tol)
  wt = np.ascontiguousarray(w.T)  # [n, k] rows, the tied-head layout
  if head:
    np.testing.assert_allclose(np.asarray(jax.jit(cpu_native.matmul_nk)(x, wt, s)), ref, **tol)
  # W8A8: each row holds a +-127, so the kernel's per-token scale is exactly 1 and x_q comes back as it is; the int32
  # sums are exact, so the only rounding is the final float scaling
  x_q = rng.integers(-127, 128, (m, k)).astype(np.int8)
  x_q[0] = 127 * np.sign(w[:, 0])  # the largest sum one column can reach, and its negation next to it
  x_q[:, -1] = 127
  exact = (x_q.astype(np.int64) @ w.astype(np.int64)) * s
  x_f = x_q.astype(np.float32)
  np.testing.assert_allclose(np.asarray(jax.jit(cpu_native.matmul_kn_w8a8)(x_f, w, s)), exact, rtol=1e-6)
  if head:
    np.testing.assert_allclose(np.asarray(jax.jit(cpu_native.matmul_nk_w8a8)(x_f, wt, s)), exact, rtol=1e-6)
  # float activations: quantized in the kernel as int8_matmul.quantize_per_token does it
  want = q8.w8a8_reference(*q8.quantize_per_token(jnp.asarray(x)), jnp.asarray(w), jnp.asarray(s))
  np.testing.assert_allclose(np.asarray(jax.jit(cpu_native.matmul_kn_w8a8)(x, w, s)), want, rtol=1e-5, atol=1e-5)
  if head:
    np.testing.assert_allclose(np.asarray(jax.jit(cpu_native.matmul_nk_w8a8)(x, wt, s)), want, rtol=1e-5, atol=1e-5)


def test_int8_activation_kernels_are_exact_at_the_extremes():
  """Every weight and activation at +-127 over a long input: the sign-flip correction of the VNNI kernels and the
  int32 sums must stay exact (a wrong correction or a saturating instruction shows here)."""
  k, n = 4096, 256
  rng = np.random.default_rng(0)
  w = (127 * rng.choice([-1, 1], (k, n))).astype(np.int8)
  x = np.stack([w[:, 0], -w[:, 1], np.full(k, 127), np.full(k, -127)]).astype(np.float32)
  ones = np.ones(n, np.float32)
  exact = x.astype(np.int64) @ w.astype(np.int64)
  assert np.abs(exact).max() == 127 * 127 * k
  np.testing.assert_array_equal(np.asarray(jax.jit(cpu_native.matmul_kn_w8a8)(x, w, ones)), exact)
  np.testing.assert_array_equal(
      np.asarray(jax.jit(cpu_native.matmul_nk_w8a8)(x, np.ascontiguousarray(w.T), ones)), exact)


def test_kernel_rejects_shapes_it_does_not_take_and_auto_falls_back():
  with pytest.raises(ValueError, match="at most 16"):
    cpu_native.matmul_kn(jnp.ones((17, 32)), jnp.ones((32, 64), jnp.int8), jnp.ones(64))
  with pytest.raises(ValueError, match="multiple of 64"):
    cpu_native.to_kernel_layout(np.zeros((8, 48), np.uint8), 4)
  with pytest.raises(ValueError, match="bits=5"):
    cpu_native.to_kernel_layout(np.zeros((8, 64), np.uint8), 5)
  spec = dataclasses.replace(SPEC, quant="int8_weight", matmul_impl="auto")
  assert quant.resolve_impl(spec, 1, 64, 32) == "native"
  assert quant.resolve_impl(spec, 1, 48, 32) == "xla"  # output size not a multiple of 64
  assert quant.resolve_impl(spec, 60, 64, 32) == "native"  # short prefills: blocks of 16 rows
  assert quant.resolve_impl(spec, quant.NATIVE_MAX_ROWS + 1, 64, 32) == "xla"  # long prefills: XLA
  assert quant.resolve_impl(dataclasses.replace(spec, matmul_impl="xla"), 1, 64, 32) == "xla"


def test_native_without_a_compiler_is_a_clear_error(monkeypatch):
  monkeypatch.setattr(cpu_native, "unavailable_reason", lambda: "no C++ compiler (g++: not found)")
  spec = dataclasses.replace(SPEC, quant="int8_weight", matmul_impl="native")
  with pytest.raises(cpu_native.NativeUnavailable, match="model.matmul_impl=native: no C\\+\\+ compiler"):
    quant.resolve_impl(spec, 1, 64, 32)
  assert quant.resolve_impl(dataclasses.replace(spec, matmul_impl="auto"), 1, 64, 32) == "xla"


def _int8_model(mode: str, impl: str):
  spec = SPEC
  params = transformer.init_params(spec, 0)
  stats = {norm: jnp.ones((spec.num_layers, spec.embed_dim)) for norm in quant.SMOOTHED}
  qspec, qparams = quant.quantize_model_params(spec, params, mode, stats)
  return transformer.from_params(dataclasses.replace(qspec, matmul_impl=impl), qparams)


@pytest.mark.parametrize("mode", ["int8_weight", "w8a8"])
def test_int8_models_decode_the_same_with_native_kernels(mode):
  from infer import generate

  prompts = [[5, 6, 7, 8, 9], [11, 12]]
  outs = {}
  for impl in ("xla", "native"):
    model = _int8_model(mode, impl)
    tokens = jnp.asarray(np.random.default_rng(0).integers(1, 256, (2, 30)))  # 60 rows: 4 native calls per matmul
    outs[impl] = (np.asarray(model(tokens)), generate.generate(model, prompts, max_new_tokens=12))
  if mode == "int8_weight":
    np.testing.assert_allclose(outs["native"][0], outs["xla"][0], rtol=1e-4, atol=1e-4)
  else:  # W8A8 rounds each activation to int8: a last-bit difference upstream (another summation order) can move a
    # value across a rounding boundary, which shifts the logits after it by about one quantization step; the first
    # position (no upstream difference yet) agrees closely, later ones within a fraction of the logits' spread (0.8)
    diff = np.abs(outs["native"][0] - outs["xla"][0])
    assert diff[:, 0].max() < 1e-4 and diff.max() < 0.1, (diff[:, 0].max(), diff.max())
  assert outs["native"][1] == outs["xla"][1]


@pytest.fixture(scope="module")
def packed_workdir(tiny_run, tmp_path_factory):
  """A 4-bit GPTQ (group 32) compression of the tiny run: (source config, float model, tokenizer, out dir)."""
  from configs import compress as compress_config
  from infer import loading
  from infer.compress import pipeline as compress

  config, model, tokenizer, step = loading.load_trained(tiny_run[0])
  c = compress_config.get_config()
  c.update(method="gptq", bits=4, group_size=32, calibration_samples=8, calibration_len=32)
  out = str(tmp_path_factory.mktemp("gptq4") / "w")
  compress.compress_workdir(config, model, tokenizer, step, c, source_workdir=tiny_run[0], out=out)
  return config, tokenizer, out


def test_compressed_workdir_is_served_packed_with_the_dequantized_models_outputs(packed_workdir):
  from infer import evaluate, generate, loading
  from workdir import layout

  config, tokenizer, out = packed_workdir
  _, packed, _, _ = loading.load_trained(out)
  _, dense, _, _ = loading.load_trained(out, dequantize=True)
  assert packed.spec.quant == "packed" and packed.spec.quant_bits == 4 and packed.spec.quant_group_size == 32
  meta = layout.read_json(layout.path(out, layout.COMPRESSION))
  # resident bytes: every block weight as its 4-bit codes plus float32 scale and zero per (group, output); no float copy
  state = nnx.to_pure_dict(nnx.state(packed, nnx.Param))
  stored_codes = sum(p["layers"] * p["in"] * p["out"] * p["bits"] // 8 for p in meta["packed"].values())
  grids = sum(2 * 4 * p["layers"] * (p["in"] // p["group_size"]) * p["out"] for p in meta["packed"].values())
  blocks = state["blocks"]
  codes = sum(blocks[path.split("/")[0]][path.split("/")[1]].nbytes for path in meta["packed"])
  assert codes == stored_codes
  assert quant.nbytes(state) == quant.nbytes(nnx.state(dense, nnx.Param)) - sum(
      4 * p["layers"] * p["in"] * p["out"] for p in meta["packed"].values()) + stored_codes + grids
  assert all(blocks[path.split("/")[0]][path.split("/")[1]].dtype == np.uint8 for path in meta["packed"])
  assert "4-bit codes" in loading.weights_note(packed)
  # greedy decoding equals the dequantized model's; perplexity within 1e-3 relative
  prompts = [[1, 40, 41, 42], [1, 50]]
  assert generate.generate(packed, prompts, max_new_tokens=16) == generate.generate(dense, prompts,
                                                                                   max_new_tokens=16)
  tokens = evaluate.validation_stream(config, tokenizer, 2048)
  ppl = [evaluate.stream_perplexity(m, tokens, 32)["ppl"] for m in (packed, dense)]
  assert abs(ppl[0] - ppl[1]) <= 1e-3 * ppl[1]


def test_int8_head_on_a_packed_workdir_equals_the_dequantized_model_with_that_head(packed_workdir):
  """--head_quant=int8: the embedding (tied head) as int8 rows + per-row scales, no float copy; greedy tokens and
  perplexity equal the dequantized model whose embedding went through the same int8 rounding; refused where it does
  not apply."""
  from infer import evaluate, generate, loading

  config, tokenizer, out = packed_workdir
  _, packed, _, _ = loading.load_trained(out)
  _, head8, _, _ = loading.load_trained(out, head_quant="int8")
  _, dense, _, _ = loading.load_trained(out, dequantize=True)
  assert head8.spec.head_quant == "int8" and head8.embed[...].dtype == np.int8
  vocab, dim = packed.embed[...].shape
  assert (quant.nbytes(nnx.state(packed, nnx.Param)) - quant.nbytes(nnx.state(head8, nnx.Param))
          == vocab * dim * 4 - (vocab * dim + vocab * 4))  # float32 rows -> int8 rows + one float32 scale per row
  assert "int8 embedding and head" in loading.weights_note(head8)
  rows = quant.quantize_head({"embed": dense.embed[...]}, tie_embeddings=True)
  dense.embed[...] = rows["embed"].astype(jnp.float32) * rows["embed_scale"][:, None]
  prompts = [[1, 40, 41, 42], [1, 50]]
  assert generate.generate(head8, prompts, max_new_tokens=16) == generate.generate(dense, prompts, max_new_tokens=16)
  tokens = evaluate.validation_stream(config, tokenizer, 2048)
  ppl = [evaluate.stream_perplexity(m, tokens, 32)["ppl"] for m in (head8, dense)]
  assert abs(ppl[0] - ppl[1]) <= 1e-3 * ppl[1]
  with pytest.raises(ValueError, match="--head_quant=int8 applies to compressed workdirs served packed"):
    loading.load_trained(out, dequantize=True, head_quant="int8")


def test_head_quant_is_refused_on_a_workdir_that_is_not_packed(tiny_run):
  from infer import loading

  with pytest.raises(ValueError, match="--head_quant=int8 applies to compressed workdirs served packed.*'none'"):
    loading.load_trained(tiny_run[0], head_quant="int8")


@pytest.mark.parametrize("transpose_a", [False, True])
@pytest.mark.parametrize("transpose_b", [False, True])
def test_batched_matmul_matches_numpy(transpose_a, transpose_b):
  """cpu_native.batched_matmul, every transpose form, odd m and k (the row remainder and short k), against float64."""
  rng = np.random.default_rng(0)
  batch, m, k, n = 5, 29, 7, 64
  a = rng.standard_normal((batch, k, m) if transpose_a else (batch, m, k)).astype(np.float32)
  b = rng.standard_normal((batch, n, k) if transpose_b else (batch, k, n)).astype(np.float32)
  want = np.einsum("bmk,bkn->bmn", (a.transpose(0, 2, 1) if transpose_a else a).astype(np.float64),
                   (b.transpose(0, 2, 1) if transpose_b else b).astype(np.float64))
  got = jax.jit(lambda a, b: cpu_native.batched_matmul(a, b, transpose_a, transpose_b))(a, b)
  np.testing.assert_allclose(np.asarray(got), want, atol=1e-4, rtol=1e-5)
  with pytest.raises(ValueError, match="n=48 must be a multiple of 32"):
    cpu_native.batched_matmul(a, b[..., :48] if not transpose_b else b[:, :48], transpose_a, transpose_b)


def test_training_steps_with_native_attention_match_xla():
  """The train step with model.matmul_impl=native (attention's batched matmuls on the kernel) gives the losses of
  matmul_impl=xla over five AdamW steps on one batch within 1e-5 (packed segments and padding rows)."""
  from test_step import random_batch, run_steps, small_config

  losses = {}
  for impl in ("xla", "native"):
    config = small_config()
    config.model.update(max_len=32, matmul_impl=impl, num_heads=1)  # head dim 32 and length 32: the kernel's sizes
    config.data.seq_len = 32
    losses[impl] = run_steps(config, [random_batch(0, length=32)] * 5)[1]
  np.testing.assert_allclose(losses["native"], losses["xla"], rtol=1e-5)
  assert losses["xla"][-1] < losses["xla"][0]


@pytest.mark.parametrize("heads,kv_heads,head_dim", [(8, 2, 64), (4, 4, 24)])
def test_paged_decode_attention_matches_the_gathering_reference(heads, kv_heads, head_dim):
  """Rows of every length (0, inside the first page, page boundaries, many pages) over scattered pages, GQA and a
  head size that is not a multiple of the vector width; the engine path picks the kernel with matmul_impl=auto."""
  from model import attention

  rng = np.random.default_rng(heads)
  rows, pages, page_size, width = 6, 48, 16, 7
  q = jnp.asarray(rng.normal(size=(rows, heads, head_dim)), jnp.float32)
  k_pages, v_pages = (jnp.asarray(rng.normal(size=(pages, page_size, kv_heads, head_dim)), jnp.float32)
                      for _ in range(2))
  table = jnp.asarray(rng.permutation(pages)[:rows * width].reshape(rows, width), jnp.int32)
  lengths = jnp.asarray([0, 1, 16, 17, 60, width * page_size], jnp.int32)
  visibility = attention.PagedVisibility(q_segment_ids=(lengths > 0).astype(jnp.int32)[:, None],
                                         q_slots=jnp.maximum(lengths - 1, 0)[:, None], page_table=table,
                                         lengths=lengths)
  reference = attention.attend_paged(q[:, None], k_pages, v_pages, visibility, impl="xla", matmul_impl="xla")
  out = jax.jit(cpu_native.paged_decode_attention, static_argnums=5)(q, k_pages, v_pages, table, lengths,
                                                                     head_dim ** -0.5)
  np.testing.assert_allclose(np.asarray(out)[1:], np.asarray(reference)[1:, 0], atol=2e-5, rtol=2e-5)
  np.testing.assert_array_equal(np.asarray(out)[0], 0)  # a dead row (padding) reads nothing
  auto = jax.jit(lambda *a: attention.attend_paged(*a, visibility, impl="xla", matmul_impl="auto"))
  assert "PeakllmPagedDecode" in auto.lower(q[:, None], k_pages, v_pages).as_text()
  np.testing.assert_allclose(np.asarray(auto(q[:, None], k_pages, v_pages))[1:],
                             np.asarray(reference)[1:], atol=2e-5, rtol=2e-5)
