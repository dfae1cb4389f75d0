"""SparseGPT, GPTQ and their baselines on random correlated inputs; calibration; compressed checkpoints."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import compress as compress_config
from infer.compress import calibrate, gptq, sparsegpt, storage, wanda
from model import quantizer


def _problem(seed, k=128, n=64, t=1024):
  """Inputs X [t, k] with correlated features and a few large channels, weights W [k, n], Hessian 2/t X^T X."""
  rng = np.random.default_rng(seed)
  mix = rng.normal(size=(k, k)) / np.sqrt(k) + np.eye(k)
  x = rng.normal(size=(t, k)) @ mix
  x[:, :4] *= 6.0
  w = rng.normal(size=(k, n)).astype(np.float32)
  return x, w, jnp.asarray(2.0 / t * x.T @ x, jnp.float32)


def _err(x, w, w2):
  return float(np.linalg.norm(x @ w - x @ np.asarray(w2, np.float64)) ** 2)


@pytest.mark.parametrize("kw", [dict(sparsity=0.5), dict(sparsity=0.7), dict(prune_n=2, prune_m=4),
                                dict(prune_n=4, prune_m=8)])
def test_sparsegpt_reconstructs_far_better_than_magnitude(kw):
  x, w, h = _problem(0)
  pruned = sparsegpt.prune_layer(w, h, block_size=32, **kw)
  baseline = sparsegpt.magnitude_prune(w, **kw)
  assert pruned.sparsity == pytest.approx(0.5 if "prune_n" in kw else kw["sparsity"], abs=1e-3)  # rounded per block
  assert baseline.sparsity == pytest.approx(pruned.sparsity, abs=1e-3)
  assert _err(x, w, pruned.weight) < 0.6 * _err(x, w, baseline.weight)
  # The OBS loss estimate is the reconstruction error in Hessian units: ||.||^2 / t (up to the dampening).
  assert pruned.loss == pytest.approx(_err(x, w, pruned.weight) / len(x), rel=0.2)


def test_unstructured_mask_has_exact_sparsity_per_block():
  _, w, h = _problem(1, k=96, n=40)
  out = sparsegpt.prune_layer(w, h, sparsity=0.3, block_size=32)
  zeros = np.asarray(out.weight == 0)  # [in, out]; blocks are 32 consecutive inputs
  for b in range(3):
    assert zeros[32 * b:32 * (b + 1)].sum() == round(0.3 * 32 * 40)


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8), (1, 4)])
def test_nm_masks_have_exactly_n_zeros_in_every_group(n, m):
  _, w, h = _problem(2, k=64, n=24)
  for out in (sparsegpt.prune_layer(w, h, prune_n=n, prune_m=m, block_size=32),
              sparsegpt.magnitude_prune(w, prune_n=n, prune_m=m)):
    groups = np.asarray(out.weight == 0).T.reshape(24, 64 // m, m)  # [out, groups, m] along the inputs
    np.testing.assert_array_equal(groups.sum(-1), n)


def test_sparsegpt_matches_brute_force_obs_on_a_tiny_layer():
  """3 outputs x 6 inputs at 50%: the three smallest inputs are pruned, and the kept weights must be the exact
  optimum argmin ||W X - W' X|| with those weights at zero (closed form), which is also the best of all masks."""
  rng = np.random.default_rng(3)
  x = rng.normal(size=(200, 6)) @ (np.eye(6) + 0.5 * rng.normal(size=(6, 6)))
  h = 2.0 / len(x) * x.T @ x
  w = rng.normal(size=(6, 3))
  w[:3] *= 1e-3  # the first three inputs are nearly free to prune
  out = sparsegpt.prune_layer(jnp.asarray(w, jnp.float32), jnp.asarray(h, jnp.float32), sparsity=0.5,
                              block_size=8, damp=0.0)
  got = np.asarray(out.weight, np.float64)

  def optimum(row, pruned):
    kept = [j for j in range(6) if j not in pruned]
    best = np.zeros(6)
    # d = w - w' with d_P = w_P fixed; minimise d^T H d over d_R: d_R = -H_RR^-1 H_RP w_P.
    best[kept] = row[kept] + np.linalg.solve(h[np.ix_(kept, kept)], h[np.ix_(kept, list(pruned))] @ row[list(pruned)])
    return best, (row - best) @ h @ (row - best)

  for r in range(3):
    row = w[:, r]
    masks = [optimum(row, p) for p in itertools.combinations(range(6), 3)]
    best_w, best_err = min(masks, key=lambda m: m[1])
    np.testing.assert_allclose(got[:, r], best_w, rtol=2e-4, atol=2e-6)
    assert (row - got[:, r]) @ h @ (row - got[:, r]) == pytest.approx(best_err, rel=1e-3)


@pytest.mark.parametrize("kw", [dict(bits=4), dict(bits=3), dict(bits=4, group_size=32), dict(bits=4, act_order=True),
                                dict(bits=3, act_order=True, group_size=32), dict(bits=2, symmetric=True)])
def test_gptq_beats_round_to_nearest_and_codes_reconstruct(kw):
  x, w, h = _problem(4)
  q = gptq.quantize_layer(w, h, block_size=64, **kw)
  rtn = gptq.rtn_layer(w, **{k: v for k, v in kw.items() if k != "act_order"})
  assert _err(x, w, q.weight) < 0.8 * _err(x, w, rtn.weight)
  size = kw.get("group_size") or w.shape[0]
  for r in (q, rtn):
    assert int(r.codes.min()) >= 0 and int(r.codes.max()) < 2 ** kw["bits"]
    assert r.scale.shape == (w.shape[0] // size, w.shape[1])
    deq = quantizer.dequantize(r.codes, jnp.repeat(r.scale, size, 0), jnp.repeat(r.zero, size, 0))
    np.testing.assert_array_equal(np.asarray(deq), np.asarray(r.weight))
    # every column holds at most 2^bits distinct values per (group, output)
    assert len(np.unique(np.asarray(r.weight[:size, 0]))) <= 2 ** kw["bits"]


def test_joint_sparsegpt_quantization_keeps_mask_and_grid():
  x, w, h = _problem(5)
  out = sparsegpt.prune_layer(w, h, prune_n=2, prune_m=4, quant_bits=4, block_size=32)
  zeros = np.asarray(out.weight == 0).T.reshape(w.shape[1], -1, 4).sum(-1)
  assert (zeros >= 2).all()  # the 2:4 mask holds; a kept weight may also round to the zero code
  deq = quantizer.dequantize(out.codes, out.scale, out.zero)
  np.testing.assert_array_equal(np.asarray(deq), np.asarray(out.weight))
  assert _err(x, w, out.weight) < _err(x, w, sparsegpt.magnitude_prune(w, prune_n=2, prune_m=4).weight)


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 7, 8, 11, 13, 16])
def test_bit_packing_round_trips(bits):
  dtype = np.uint8 if bits <= 8 else np.uint16
  codes = np.random.default_rng(bits).integers(0, 2 ** bits, size=(3, 17, 5)).astype(dtype)
  packed = storage.pack_codes(codes, bits)
  assert packed.size == -(-codes.size * bits // 8)
  got = storage.unpack_codes(packed, bits, codes.shape)
  assert got.dtype == dtype
  np.testing.assert_array_equal(got, codes)
  if bits <= 8:  # the layout of the first release: codes of 8 bits or fewer, `bits` per code, most significant first
    legacy = np.packbits(np.unpackbits(codes.reshape(-1, 1), axis=1)[:, 8 - bits:].reshape(-1))
    np.testing.assert_array_equal(packed, legacy)


def test_dead_inputs_are_zeroed_and_hessian_stays_invertible():
  x, w, h = _problem(6, k=32, n=8)
  h = h.at[5, :].set(0).at[:, 5].set(0)
  out = gptq.quantize_layer(w, h, bits=4, block_size=32)
  assert bool(jnp.all(jnp.isfinite(out.weight)))
  np.testing.assert_array_equal(np.asarray(out.weight[5]), 0)


@pytest.mark.parametrize("kw", [dict(sparsity=0.5), dict(prune_n=2, prune_m=4)])
def test_wanda_keeps_the_weights_on_outlier_features_and_beats_magnitude(kw):
  """_problem's first 4 inputs are 6x larger: Wanda keeps more of their weights than magnitude does, prunes exactly
  round(s * in) inputs of every output (or n of every m), and reconstructs the layer output better."""
  x, w, h = _problem(3)
  out = wanda.prune_layer(w, h, **kw)
  base = sparsegpt.magnitude_prune(w, **kw)
  zeros = np.asarray(out.weight == 0)  # [in, out]
  if "prune_n" in kw:  # (the four large inputs share one group: two of them are kept either way)
    np.testing.assert_array_equal(zeros.T.reshape(64, 32, 4).sum(-1), 2)
  else:
    np.testing.assert_array_equal(zeros.sum(0), 64)  # every output: 64 of its 128 inputs
    kept = np.asarray(w != 0) & ~zeros
    assert kept[:4].mean() > np.asarray(base.weight != 0)[:4].mean() + 0.2
  np.testing.assert_array_equal(np.asarray(out.weight)[~zeros], w[~zeros])  # kept weights are not updated
  assert _err(x, w, out.weight) < (1.0 if "prune_n" in kw else 0.8) * _err(x, w, base.weight)


def test_owl_sparsities_average_the_target_and_favour_outlier_blocks():
  got = wanda.owl_sparsities([0.01, 0.03, 0.02, 0.05], sparsity=0.7, lam=0.08)
  assert np.mean(got) == pytest.approx(0.7)
  assert np.argsort(got).tolist() == [3, 1, 2, 0]  # more outliers, fewer pruned weights
  assert max(got) - min(got) == pytest.approx(0.16)
  assert wanda.owl_sparsities([0.02, 0.02], sparsity=0.5, lam=0.1) == [0.5, 0.5]
  x, w, h = _problem(4)
  n, total = wanda.outliers(w, h, threshold=3.0)
  s = np.abs(w) * np.sqrt(np.diag(np.asarray(h)))[:, None]
  assert (n, total) == (int((s > 3.0 * s.mean()).sum()), w.size)


def test_compress_config_errors_name_the_key():
  c = compress_config.get_config()
  c.method = "obc"
  with pytest.raises(ValueError, match="compress.method='obc'"):
    compress_config.validate(c)
  c = compress_config.get_config()
  c.update(method="gptq", bits=0)
  with pytest.raises(ValueError, match="compress.bits=0"):
    compress_config.validate(c)
  c = compress_config.get_config()
  c.update(prune_n=4, prune_m=4)
  with pytest.raises(ValueError, match="prune_n"):
    compress_config.validate(c)
  for bad, key in ((dict(method="gptq", bits=4, layer_sparsity="owl"), "layer_sparsity"),
                   (dict(layer_sparsity="owl", prune_n=2, prune_m=4), "layer_sparsity"),
                   (dict(layer_sparsity="owl", sparsity=0.9, sparsity_spread=0.2), "sparsity_spread"),
                   (dict(layer_sparsity="layerwise"), "layer_sparsity"), (dict(method="wanda", bits=4), "bits")):
    c = compress_config.get_config()
    c.update(bad)
    with pytest.raises(ValueError, match=f"compress.{key}="):
      compress_config.validate(c)
  with pytest.raises(ValueError, match="group_size=48"):
    gptq.quantize_layer(jnp.ones((64, 4)), jnp.eye(64), bits=4, group_size=48)


# -- whole-model paths on the shared tiny run -----------------------------------------------------------------------


def test_calibration_hessians_follow_the_compressed_model(tiny_run):
  """With a 'compression' that halves every weight, each Hessian must be 2/n X^T X of the inputs that the final
  (halved) model feeds that layer: earlier groups and blocks already compressed (true_sequential)."""
  from flax import nnx

  from infer import loading
  from model import transformer
  from model.attention import Visibility

  config, model, _, _ = loading.load_trained(tiny_run[0])
  samples = np.random.default_rng(0).integers(0, config.model.vocab_size, size=(5, 16)).astype(np.int32)
  seen = {}

  def halve(i, path, w, h):
    seen[(i, path)] = h
    return w * 0.5

  params = calibrate.sequential(model, samples, halve, batch_size=2)
  final = transformer.from_params(model.spec, params)
  blocks = nnx.split(final.blocks)
  b, l = samples.shape
  pos = jnp.broadcast_to(jnp.arange(l), (b, l))
  vis = Visibility.causal_self(jnp.ones((b, l), jnp.int32))
  x = final.embed_tokens(jnp.asarray(samples), pos)
  gram = lambda a: 2.0 / (b * l) * np.einsum("ti,tj->ij", *(np.asarray(a, np.float64).reshape(b * l, -1),) * 2)  # noqa: E731
  for i in range(config.model.num_layers):
    block = nnx.merge(blocks[0], jax.tree.map(lambda a: a[i], blocks[1]))
    a = block.attn_norm(x)
    heads, _ = block.attn.mix(a, pos, vis)
    h = x + block.attn.project_out(heads)
    m = block.mlp_norm(h)
    expected = {"attn/wq": gram(a), "attn/wo": gram(heads), "mlp/w_in": gram(m), "mlp/w_out": gram(block.mlp.hidden(m))}
    for path, ref in expected.items():
      np.testing.assert_allclose(np.asarray(seen[(i, path)]), ref, rtol=2e-3, atol=2e-3 * np.abs(ref).max())
    x = block(x, pos, vis)[0]
  assert set(seen) == {(i, p) for i in range(config.model.num_layers)
                       for p in ("attn/wq", "attn/wk", "attn/wv", "attn/wo", "mlp/w_in", "mlp/w_out")}


@pytest.mark.parametrize("overrides", [dict(method="gptq", bits=3, group_size=32),
                                       dict(method="sparsegpt", prune_n=2, prune_m=4, bits=4)])
def test_compressed_workdir_round_trips(tiny_run, tmp_path, overrides):
  from infer import evaluate, loading
  from infer.compress import pipeline as compress

  config, model, tokenizer, step = loading.load_trained(tiny_run[0])
  c = compress_config.get_config()
  c.update(calibration_samples=8, calibration_len=32, **overrides)
  out = str(tmp_path / "compressed")
  result = compress.compress_workdir(config, model, tokenizer, step, c, source_workdir=tiny_run[0], out=out)
  _, loaded, _, loaded_step = loading.load_trained(out, dequantize=True)
  assert loaded_step == step
  from flax import nnx
  for a, b in zip(jax.tree.leaves(result["params"]), jax.tree.leaves(nnx.to_pure_dict(nnx.state(loaded)))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  meta = result["metadata"]
  # codes plus a float32 scale and a uint8 zero per group of inputs (tiny model: every layer has 64 or 256 inputs)
  assert overrides["bits"] < meta["summary"]["bits_per_weight"] <= overrides["bits"] + 40 / (c.group_size or 64)
  if "prune_n" in overrides:
    assert all(s >= 0.5 for w in meta["summary"]["weights"].values() for s in w["sparsity"])
  assert "bits per weight" in loading.compression_note(out)
  tokens = evaluate.validation_stream(config, tokenizer, 4096)
  dense = evaluate.stream_perplexity(model, tokens, 32)["ppl"]
  compressed = evaluate.stream_perplexity(loaded, tokens, 32)["ppl"]
  assert np.isfinite(compressed) and compressed < 2.0 * dense
  # served as stored (uint8 codes, model.quant=packed): the dequantized model's perplexity and greedy tokens
  from infer import generate
  _, packed, _, _ = loading.load_trained(out)
  assert packed.spec.quant == "packed" and packed.spec.quant_bits == overrides["bits"]
  served = evaluate.stream_perplexity(packed, tokens, 32)["ppl"]
  assert abs(served - compressed) <= 1e-3 * compressed
  prompts = [[1, 30, 31], [1, 60, 61, 62, 63]]
  assert generate.generate(packed, prompts, max_new_tokens=8) == generate.generate(loaded, prompts, max_new_tokens=8)


def test_owl_prunes_each_block_to_its_outlier_weighted_sparsity(tiny_run):
  from infer import loading
  from infer.compress import pipeline as compress

  config, model, tokenizer, _ = loading.load_trained(tiny_run[0])
  samples = np.random.default_rng(0).integers(0, config.model.vocab_size, size=(8, 32)).astype(np.int32)
  ratios = compress.block_outlier_ratios(model, samples, threshold=3.0)
  assert len(ratios) == config.model.num_layers and all(0 < r < 0.2 for r in ratios) and ratios[0] != ratios[1]
  c = compress_config.get_config()
  c.update(method="wanda", sparsity=0.6, layer_sparsity="owl", owl_threshold=3.0, sparsity_spread=0.1)
  _, layers, _, targets = compress.compress_model(model, c, samples)
  assert targets == pytest.approx(wanda.owl_sparsities(ratios, 0.6, 0.1))
  assert np.mean(targets) == pytest.approx(0.6) and max(targets) - min(targets) == pytest.approx(0.2)
  for results in layers.values():  # Wanda prunes round(s * in) inputs per output: the block's target, to rounding
    for target, r in zip(targets, results):
      assert r.sparsity == pytest.approx(target, abs=1.0 / r.weight.shape[0])
  costs = compress.block_sensitivities(model, samples, 0.6)  # the sensitivity probe: the loss each block's pruning costs
  assert len(costs) == config.model.num_layers and all(np.isfinite(costs)) and max(costs) > 0
  c.layer_sparsity = "sensitivity"
  assert compress.compress_model(model, c, samples)[3] == pytest.approx(wanda.owl_sparsities(costs, 0.6, 0.1))


def test_stream_perplexity_is_independent_of_batching(tiny_run):
  from infer import evaluate, loading

  config, model, tokenizer, _ = loading.load_trained(tiny_run[0])
  tokens = evaluate.validation_stream(config, tokenizer, 2000)
  one = evaluate.stream_perplexity(model, tokens, 48, batch_size=1)
  many = evaluate.stream_perplexity(model, tokens, 48, batch_size=5)  # 41 windows: a padded last batch
  assert one["windows"] == 2000 // 48 and one["tokens"] == one["windows"] * 47
  assert many["loss"] == pytest.approx(one["loss"], rel=1e-5)
  # the reference: a plain per-window loop over the model's logits
  windows = tokens[:one["windows"] * 48].reshape(-1, 48)
  logits = np.asarray(model(jnp.asarray(windows[:, :-1])), np.float64)
  logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logits.max(-1, keepdims=True)
  ref = -np.take_along_axis(logp, windows[:, 1:, None], -1).mean()
  assert one["loss"] == pytest.approx(ref, rel=1e-4)
  with pytest.raises(ValueError, match="seq_len=1000"):
    evaluate.stream_perplexity(model, tokens, 1000)


def test_case_study_orders_the_methods_and_writes_table_json_and_plot(case_study_run, tmp_path):
  """On a small model trained long enough (conftest.case_study_run): SparseGPT beats magnitude pruning at 50%, GPTQ
  beats round-to-nearest at 3 bits, sensitivity-weighted layer sparsities beat uniform SparseGPT at 70%; the tables,
  JSON and plot are written."""
  import json

  from scripts import case_study_sparsegpt as case

  out = str(tmp_path / "case")
  only = ["dense", "magnitude 50%", "sparsegpt 50%", "rtn 3-bit", "gptq 3-bit", "sparsegpt 70%",
          "sparsegpt 70% sensitivity"]
  report = case.run(case_study_run[0], out, calibration_samples=64, eval_tokens=20000, only=only, curve=[0.7],
                    layer_sparsities=[0.7], sparsity_spread=0.1)
  rows = {r["label"]: r for r in report["rows"] + report["layer_sparsity"]}
  assert list(rows) == only
  ppl = {label: r["ppl"] for label, r in rows.items()}
  assert ppl["dense"] < ppl["sparsegpt 50%"] < ppl["magnitude 50%"], ppl
  assert ppl["dense"] < ppl["gptq 3-bit"] < ppl["rtn 3-bit"], ppl
  assert ppl["sparsegpt 70% sensitivity"] < ppl["sparsegpt 70%"], ppl
  assert rows["sparsegpt 50%"]["sparsity"] == pytest.approx(0.5, abs=1e-3)
  assert rows["sparsegpt 70% sensitivity"]["sparsity"] == pytest.approx(0.7, abs=2e-3)
  assert 3 < rows["gptq 3-bit"]["bits_per_weight"] < 4
  assert rows["dense"]["paper_opt125m"] == 27.66
  assert [p["sparsity"] for p in report["curve"]["wanda"]] == [0.7]
  with open(f"{out}/results.json") as f:
    assert json.load(f)["rows"][0]["label"] == "dense"
  with open(f"{out}/results.md") as f:
    text = f.read()
  assert "| sparsegpt 50% |" in text and "| sparsegpt | 70.0% |" in text
  with open(f"{out}/sparsity_curve.png", "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("norm_position", ["pre", "post"])
def test_calibration_block_pass_is_the_model_block(norm_position):
  """The calibration walk through a block (which records each linear layer's input) computes what `Block` does,
  post-norm blocks (OPT-350m) included."""
  from flax import nnx
  from model.attention import Visibility
  from model.transformer import ModelSpec, Transformer

  spec = ModelSpec(family="gpt", vocab_size=64, num_layers=2, embed_dim=32, num_heads=4, num_kv_heads=4, head_dim=8,
                   mlp_dim=64, max_len=16, norm_position=norm_position, init_std=0.2)
  model = Transformer(spec, rngs=nnx.Rngs(params=0))
  graphdef, blocks = nnx.split(model.blocks)
  layer = jax.tree.map(lambda a: a[0], nnx.to_pure_dict(blocks))
  x = jax.random.normal(jax.random.key(1), (2, 16, 32))
  got, grams = calibrate.make_block_pass(graphdef)(layer, x, ("mlp_in",))
  block = nnx.merge(graphdef, layer)
  positions = jnp.broadcast_to(jnp.arange(16), (2, 16))
  want, _, _ = block(x, positions, Visibility.causal_self(jnp.ones((2, 16), jnp.int32)))
  np.testing.assert_allclose(got, want, atol=1e-5)
  assert grams["mlp_in"].shape == (32, 32)
