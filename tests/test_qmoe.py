"""QMoE: ternary GPTQ over batched experts, routed calibration, the lossless ternary code, the fused decode kernel,
and the coded checkpoint."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from infer.compress import qmoe, storage
from model import quantizer
from infer.compress import ternary_code as tc
from model import moe as moe_lib
from model.attention import Visibility
from model.kernels import ternary_matvec as tm
from workdir import tokenizer as tokenizer_lib


def _experts(seed, e=3, k=64, n=32, t=512):
  rng = np.random.default_rng(seed)
  xs, hs = [], []
  for _ in range(e):
    x = rng.normal(size=(t, k)) @ (np.eye(k) + rng.normal(size=(k, k)) / np.sqrt(k))
    xs.append(x)
    hs.append(2.0 / t * x.T @ x)
  w = rng.standard_t(4, size=(e, k, n)).astype(np.float32) / 4  # heavy tails, like trained experts
  return xs, jnp.asarray(w), jnp.asarray(np.stack(hs), jnp.float32)


def test_ternary_gptq_beats_ternary_rtn_on_every_expert():
  xs, w, h = _experts(0)
  gptq = qmoe.compress_experts(w, h, mode="ternary_gptq", block_size=32)
  rtn = qmoe.compress_experts(w, None, mode="ternary_rtn")
  for e, x in enumerate(xs):
    err = lambda q: np.linalg.norm(x @ np.asarray(w[e]) - x @ np.asarray(q[e])) ** 2  # noqa: E731
    assert err(gptq.weight) < 0.8 * err(rtn.weight)
    lo, hi = np.asarray(gptq.grid[0][e]), np.asarray(gptq.grid[1][e])  # [out]
    q = np.asarray(gptq.weight[e])  # [in, out]: every column (output row) uses only {lo, 0, hi}
    assert np.all((q == 0) | (q == lo[None, :]) | (q == hi[None, :]))
    np.testing.assert_array_equal(
        np.asarray(quantizer.ternary_dequantize(gptq.codes[e], lo[None, :], hi[None, :])), q)
  assert float(jnp.mean(gptq.codes == 0)) > 0.5  # the natural sparsity of ternary GPTQ


def test_two_bit_gptq_experts_beat_rtn():
  xs, w, h = _experts(1)
  q = qmoe.compress_experts(w, h, mode="gptq", bits=2, block_size=32)
  r = qmoe.compress_experts(w, None, mode="rtn", bits=2)
  errs = [(np.linalg.norm(x @ (np.asarray(w[e]) - np.asarray(q.weight[e]))),
           np.linalg.norm(x @ (np.asarray(w[e]) - np.asarray(r.weight[e])))) for e, x in enumerate(xs)]
  assert all(a < b for a, b in errs)


@pytest.mark.parametrize("p0,shape", [(0.9, (300, 257)), (0.6, (64, 100)), (1.0, (5, 33))])
def test_ternary_code_round_trips_bit_for_bit_near_the_entropy_bound(p0, shape):
  rng = np.random.default_rng(int(p0 * 10))
  rest = (1 - p0) / 2
  sym = rng.choice(3, size=shape, p=[p0, rest, rest]).astype(np.uint8)
  d = tc.build_dictionary(sym, code_bits=12, max_len=24)
  enc = tc.encode(sym, d)
  np.testing.assert_array_equal(tc.decode(enc, d), sym)
  bits, bound = enc.bits_per_symbol(12, with_offsets=False), tc.entropy_bits(sym)
  if p0 < 1.0:
    assert bound * 0.98 < bits < 1.35 * bound + 0.05
  else:
    assert bits <= 12 * np.ceil(shape[1] / 24) / shape[1] + 1e-9  # all-zero rows: runs of max_len zeros


@pytest.mark.parametrize("m", [1, 3])
def test_fused_decode_matvec_equals_decode_then_matmul(m):
  rng = np.random.default_rng(m)
  sym = rng.choice(3, size=(24, 80), p=[0.8, 0.1, 0.1])
  d = tc.build_dictionary(sym, code_bits=9, max_len=12)
  enc = tc.encode(sym, d)
  lo = -jnp.abs(jnp.asarray(rng.normal(size=24), jnp.float32))
  hi = jnp.abs(jnp.asarray(rng.normal(size=24), jnp.float32))
  x = jnp.asarray(rng.normal(size=(m, 80)), jnp.float32)
  got = tm.ternary_matvec(x, jnp.asarray(enc.codes.astype(np.int32)), jnp.asarray(enc.offsets),
                          jnp.asarray(d.entries), jnp.asarray(d.lengths), lo, hi, interpret=True)
  want = tm.ternary_matvec_reference(x, tc.decode(enc, d), lo, hi)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)


def test_expert_hessians_use_the_tokens_the_router_sends(tiny_moe_run):
  from infer import loading

  _, model, _, _ = loading.load_trained(tiny_moe_run[0])
  work = model.unstacked()
  block = work.blocks[0].layers[1]  # the first MoE block
  spec = model.spec
  ids = jax.random.randint(jax.random.key(0), (2, 16), 0, spec.vocab_size)
  pos = jnp.broadcast_to(jnp.arange(16), (2, 16))
  vis = Visibility.causal_self(jnp.ones((2, 16), jnp.int32))
  x = work.blocks[0].layers[0](work.embed_tokens(ids, pos), pos, vis)[0]
  h, counts = qmoe._expert_hessians(block, [x], pos, vis, token_cap=100.0, which="in")
  flat = np.asarray(block.mlp_norm(x + block.attn(block.attn_norm(x), pos, vis)[0]).reshape(-1, spec.embed_dim),
                    np.float64)
  r = moe_lib.route(jnp.asarray(flat, jnp.float32), block.moe.router[...], spec.experts_per_token, True)
  chosen = np.asarray(r.expert_ids)
  for e in range(spec.num_experts):
    rows = flat[(chosen == e).any(1)]
    assert counts[e] == len(rows)
    if len(rows):
      np.testing.assert_allclose(np.asarray(h[e]), 2.0 / len(rows) * rows.T @ rows, rtol=1e-4, atol=1e-5)
  assert int(counts.sum()) == 32 * spec.experts_per_token


def test_qmoe_model_compresses_codes_and_reloads_bit_exact(tiny_moe_run, tmp_path):
  from infer import evaluate, loading
  from infer.compress import calibrate

  workdir = tiny_moe_run[0]
  config, model, tokenizer, step = loading.load_trained(workdir)
  before = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  samples = calibrate.calibration_samples(config, tokenizer, num_samples=8, seq_len=32, seed=0)
  from configs import compress as compress_config
  from infer.compress import pipeline as compress

  with pytest.raises(ValueError, match="QMoE"):  # the dense-model methods refuse MoE models
    compress.compress_workdir(config, model, tokenizer, step, compress_config.get_config(), source_workdir=workdir)
  with pytest.raises(ValueError, match="dead_zone=1.0"):
    qmoe.compress_model(model, samples, batch_size=4, dead_zone=1.0)
  nearest_params, nearest, _ = qmoe.compress_model(model, samples, batch_size=4)
  params, results, stats = qmoe.compress_model(model, samples, batch_size=4, dead_zone=0.7)
  zeros = lambda rs: np.mean([float(jnp.mean(r.codes == 0)) for r in rs.values()])  # noqa: E731
  assert zeros(results) > zeros(nearest) + 0.05  # a wider dead zone rounds more weights to 0
  for r in results.values():  # grids are float16 values, as stored
    assert np.array_equal(np.asarray(r.grid[1]), np.asarray(r.grid[1]).astype(np.float16).astype(np.float32))
  assert set(results) == {(u, 1, n) for u in range(config.model.num_layers // 2) for n in ("w_in", "w_out")}
  assert np.asarray(stats["tokens_per_expert"]).sum(1).max() <= 8 * 32 * 2
  # non-expert parameters are untouched; expert weights hold at most 3 values per output row
  flat_before, flat_after = jax.tree_util.tree_flatten_with_path(before)[0], jax.tree_util.tree_flatten_with_path(params)[0]
  for (path, a), (_, b) in zip(flat_before, flat_after):
    name = jax.tree_util.keystr(path)
    if "'moe'" in name and ("w_in" in name or "w_out" in name):
      w = np.asarray(b)  # [units, experts, in, out]
      assert all(len(np.unique(w[u, e, :, o])) <= 3 for u in range(w.shape[0]) for e in range(w.shape[1])
                 for o in range(0, w.shape[3], 7))
      assert not np.array_equal(np.asarray(a), w)
    else:
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  enc = qmoe.encode_model(results, code_bits=12, max_len=16)
  assert enc["entropy_bits"] < np.log2(3) and enc["bits_per_weight"] > 0
  out = str(tmp_path / "qmoe")
  storage.save_qmoe(out, config=config, source_workdir=workdir, step=step, params=params, results=results,
                    encoding=enc, metadata={"label": "QMoE", "method": {"method": "qmoe"}, "time_s": 0.0,
                                            "summary": {"sparsity": enc["zeros"], "bits_per_weight": enc["bits_per_weight"],
                                                        "compressed_params": enc["symbols"], "scope": "expert weights"}})
  _, reloaded, _, reloaded_step = loading.load_trained(out)
  assert reloaded_step == step
  # every stored byte counted: the arrays read back from the checkpoint are what encode_model sized
  coded, d, sizes, dictionary_bytes, _, _ = storage.read_qmoe(out)
  stored = 8 * (sum(sum(v.values()) for v in sizes.values()) + dictionary_bytes)
  padding = 8 * (len(sizes) * 4 + 2)  # each array rounds up to whole bytes
  assert enc["bits_per_weight"] * enc["symbols"] <= stored <= enc["bits_per_weight"] * enc["symbols"] + padding
  assert sum(enc["parts"].values()) == pytest.approx(enc["bits_per_weight"])
  assert {a for v in sizes.values() for a in v} == {"codes", "counts", "lo", "hi"}
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(nnx.to_pure_dict(nnx.state(reloaded, nnx.Param)))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert "expert weights" in loading.compression_note(out)
  tokens = evaluate.validation_stream(config, tokenizer, 2048)
  dense = evaluate.stream_perplexity(model, tokens, 32)["loss"]
  assert np.isfinite(evaluate.stream_perplexity(reloaded, tokens, 32)["loss"]) and dense > 0
  from model import transformer  # ternary GPTQ beats ternary RTN on the validation loss

  rtn_params = qmoe.compress_model(model, samples, mode="ternary_rtn")[0]
  loss = lambda p: evaluate.stream_perplexity(transformer.from_params(model.spec, p), tokens, 32)["loss"]  # noqa: E731
  assert dense < loss(nearest_params) < loss(rtn_params)
  # matmul_impl=pallas: decode steps run the experts straight from the coded streams through the fused kernel
  from infer import generate

  _, fused, _, _ = loading.load_trained(out, matmul_impl="pallas")
  assert fused.blocks[0].layers[1].moe.coded is not None
  prompt = tokenizer_lib.encode_document(tokenizer, "def f(")
  assert generate.generate(fused, [prompt], max_new_tokens=6) == generate.generate(reloaded, [prompt], max_new_tokens=6)
  cache = reloaded.init_cache(1, 16)
  ids = jnp.asarray([prompt[:4]], jnp.int32)
  pos, seg = jnp.arange(4)[None], jnp.ones((1, 4), jnp.int32)
  logits_dense, cache = reloaded.extend(ids, pos, seg, cache)
  step_dense, _ = reloaded.extend(ids[:, -1:], pos[:, -1:] + 1, seg[:, :1], cache)
  step_fused, _ = fused.extend(ids[:, -1:], pos[:, -1:] + 1, seg[:, :1], cache)
  np.testing.assert_allclose(np.asarray(step_fused), np.asarray(step_dense), rtol=1e-4, atol=1e-4)
