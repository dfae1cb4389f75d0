"""int8 inference: SmoothQuant keeps the float function, quantized logits stay close, xla and pallas matmul paths
agree, and a quantized tiny model keeps its held-out perplexity (W8A16 within 1%, W8A8 within 3%) at about half the
bf16 bytes, then loads and generates like any workdir."""

import dataclasses
import os

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import tiny_config
from infer import evaluate, generate, loading
from model import quant, transformer
from model.transformer import ModelSpec, Transformer
from infer.quantize import quantize_workdir
from train import trainer


def small_model(family):
  spec = ModelSpec(family=family, vocab_size=64, num_layers=2, embed_dim=32, num_heads=4,
                   num_kv_heads=2 if family == "llama" else 4, head_dim=8, mlp_dim=64, max_len=32,
                   use_bias=family == "gpt", tie_embeddings=family == "gpt")
  return spec, Transformer(spec, rngs=nnx.Rngs(params=0))


def a_batch(seed=0):
  x = jnp.asarray(np.random.default_rng(seed).integers(0, 64, (2, 16)), jnp.int32)
  return {"inputs": x, "positions": jnp.broadcast_to(jnp.arange(16, dtype=jnp.int32), (2, 16)),
          "segment_ids": jnp.ones((2, 16), jnp.int32)}


def build(spec, params):
  return transformer.from_params(spec, params)


@pytest.mark.parametrize("family", ["gpt", "llama"])
def test_smoothquant_migration_leaves_the_float_function_unchanged(family):
  spec, model = small_model(family)
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  batch = a_batch()
  stats = quant.calibrate(model, [batch])
  assert stats["attn_norm"].shape == (2, 32) and bool((stats["mlp_norm"] > 0).all())
  smoothed = quant.smooth(params, stats, alpha=0.5)
  assert not np.allclose(smoothed["blocks"]["attn"]["wq"], params["blocks"]["attn"]["wq"])  # weights did move
  np.testing.assert_allclose(build(spec, smoothed)(batch["inputs"]), model(batch["inputs"]), atol=1e-5)


@pytest.mark.parametrize("family", ["gpt", "llama"])
@pytest.mark.parametrize("mode", ["int8_weight", "w8a8"])
def test_quantized_logits_are_close_and_pallas_matches_xla(family, mode):
  spec, model = small_model(family)
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  batch = a_batch(1)
  qspec, qparams = quant.quantize_model_params(spec, params, mode, quant.calibrate(model, [batch]))
  assert qparams["blocks"]["attn"]["wq"].dtype == jnp.int8 and qparams["embed"].dtype == jnp.int8
  want = model(batch["inputs"])
  outs = {impl: build(dataclasses.replace(qspec, matmul_impl=impl), qparams)(batch["inputs"])
          for impl in ("xla", "pallas")}
  np.testing.assert_allclose(outs["pallas"], outs["xla"], atol=1e-5)
  assert float(jnp.abs(outs["xla"] - want).max()) < 0.02 * float(jnp.abs(want).max())


def test_quantizing_twice_or_without_calibration_is_refused():
  spec, model = small_model("llama")
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  with pytest.raises(ValueError, match="w8a8 needs calibration"):
    quant.quantize_model_params(spec, params, "w8a8")
  qspec, qparams = quant.quantize_model_params(spec, params, "int8_weight")
  with pytest.raises(ValueError, match="already quantized"):
    quant.quantize_model_params(qspec, qparams, "int8_weight")


@pytest.mark.parametrize("mode,max_ratio", [("int8_weight", 1.01), ("w8a8", 1.03)])
def test_quantized_tiny_model_keeps_perplexity_at_half_the_bytes(tiny_run, tmp_path, mode, max_ratio):
  workdir, summary = tiny_run
  out = str(tmp_path / mode)
  result = quantize_workdir(workdir, out, mode, calibration_batches=2)
  assert result["quantized_bytes"] < 0.6 * result["bfloat16_bytes"]
  config, model, tokenizer, step = loading.load_trained(out)
  assert config.model.quant == mode and step == summary["step"]
  assert model.blocks.mlp.w_in[...].dtype == jnp.int8
  float_config, float_model, _, _ = loading.load_trained(workdir)
  float_ppl = evaluate.perplexity(float_model, float_config, tokenizer)["eval_ppl"]
  quant_ppl = evaluate.perplexity(model, config, tokenizer)["eval_ppl"]
  assert float_ppl == pytest.approx(summary["eval_ppl"], rel=1e-4)
  assert quant_ppl <= max_ratio * float_ppl and quant_ppl >= float_ppl / max_ratio, (quant_ppl, float_ppl)
  (text,) = generate.generate_text(model, tokenizer, ["def f("], max_new_tokens=8)
  assert isinstance(text, str) and text
  with pytest.raises(FileExistsError):
    quantize_workdir(workdir, out, mode)
  assert os.path.exists(os.path.join(out, "tokenizer.json"))


def test_training_a_quantized_config_is_refused(data_dir, tmp_path):
  config = tiny_config(data_dir)
  config.model.quant = "int8_weight"
  with pytest.raises(ValueError, match="is for inference"):
    trainer.run(config, str(tmp_path))
