"""LoRA / QLoRA fine-tuning: adapters start as the identity, only they train, merging is exact, PEFT reads and writes
them, fine-tuning data masks prompts, runs resume bitwise, and bad settings or records are named."""

import dataclasses
import functools
import json
import logging
import os
import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from configs import base
from conftest import tiny_config
from infer import generate, loading
from infer.engine import Engine
from infer.sampling import SamplingParams
from infer.scheduler import Scheduler
from infer.server import BadRequest, Server
from model import lora, peft, quant, transformer
from model import hf
from model.transformer import ModelSpec
from train import data as data_lib
from train import setup as setup_lib
from scripts import convert
from scripts import plan as plan_lib
from train import sft, trainer, validation
from train import step as step_lib
from workdir import tokenizer as tokenizer_lib

ALL = "q,k,v,o,mlp_in,mlp_gate,mlp_out"


def small(family="llama", kv_heads=2, **lora_keys):
  c = base.get_config()
  c.model.update(family=family, vocab_size=128, num_layers=2, embed_dim=64, num_heads=4, max_len=32,
                 num_kv_heads=kv_heads if family == "llama" else 0, tie_embeddings=family != "llama")
  c.data.seq_len = 32
  c.train.update(batch_size=4, steps=10, warmup_steps=0, learning_rate=1e-2)
  c.mesh.data = 1
  c.train.lora.update({"rank": 4, "alpha": 8.0, **lora_keys})
  return base.validate(c)


def perturbed(adapters, seed=1, scale=0.1):
  leaves, tree = jax.tree.flatten(adapters)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return jax.tree.unflatten(tree, [a + scale * jax.random.normal(k, a.shape, a.dtype) for a, k in zip(leaves, keys)])


def random_batch(seed, batch=4, length=32, vocab=128):
  rng = np.random.default_rng(seed)
  ids = rng.integers(0, vocab, (batch, length + 1)).astype(np.int32)
  return {"inputs": ids[:, :-1], "targets": ids[:, 1:], "segment_ids": np.ones((batch, length), np.int32),
          "positions": np.broadcast_to(np.arange(length, dtype=np.int32), (batch, length)).copy(),
          "weights": np.ones((batch, length), np.float32)}


X = jnp.asarray(np.arange(40).reshape(2, 20) % 128, jnp.int32)


@functools.partial(jax.jit, static_argnums=0)
def logits(spec, params, x=X):
  """The model of `spec` on `params` (one compiled program: op-by-op dispatch costs seconds here)."""
  return transformer.from_params(spec, params)(x)


@functools.partial(jax.jit, static_argnums=(0, 1))
def init(spec, seed=0):
  return transformer.init_params(spec, seed)


@pytest.mark.parametrize("family,targets", [("llama", ALL), ("gpt", "q,v,mlp_out")])
def test_a_fresh_adapter_is_the_identity_and_merging_is_exact(family, targets):
  c = small(family, targets=targets)
  spec, float_spec = ModelSpec.from_config(c.model, c.train.lora), ModelSpec.from_config(c.model)
  adapters, frozen = lora.split(init(spec))
  assert set(adapters["blocks"]["attn"]) == {"wq_lora_a", "wq_lora_b", "wv_lora_a", "wv_lora_b"} | (
      {"wk_lora_a", "wk_lora_b", "wo_lora_a", "wo_lora_b"} if family == "llama" else set())
  base_logits = logits(float_spec, frozen)
  np.testing.assert_array_equal(logits(spec, lora.combine(adapters, frozen)), base_logits)
  trained = lora.combine(perturbed(adapters), frozen)
  unmerged = logits(spec, trained)
  assert float(jnp.abs(unmerged - base_logits).max()) > 0.1  # the adapters do something
  merged = logits(float_spec, lora.merge(spec, trained))
  np.testing.assert_allclose(merged, unmerged, atol=2e-5)


def test_only_the_adapters_train_and_only_they_have_optimizer_state():
  c = small()
  full, lo = setup_lib.build(small(rank=0)), setup_lib.build(c)
  state = lo.init_state()
  adapters = lora.count(state["params"])
  moments = sum(np.prod(x.shape) for x in jax.tree.leaves(state["opt_state"]) if np.ndim(x) > 0)
  assert moments == 2 * adapters  # AdamW's mu and nu, for the adapters only
  assert adapters < 0.2 * lora.count(state["frozen"])
  before = jax.device_get(state)
  state, metrics = lo.train_step(state, random_batch(0))
  after = jax.device_get(state)
  assert np.isfinite(float(metrics["loss"]))
  for a, b in zip(jax.tree.leaves(before["frozen"]), jax.tree.leaves(after["frozen"])):
    np.testing.assert_array_equal(a, b)
  changed = [not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(before["params"]), jax.tree.leaves(after["params"]))]
  assert all(changed)  # every A and B moved (B from zero: Adam's first step moves every entry)
  # the saving shows in the compiled step: fewer argument bytes (no float32 gradients or moments for the base)
  size = lambda s: s.compile().memory_analysis().argument_size_in_bytes  # noqa: E731
  assert size(lo) < 0.5 * size(full)


@pytest.mark.parametrize("base_quant", ["int8", "int4"])
def test_qlora_keeps_the_base_quantized_and_computes_the_dequantized_model(base_quant):
  c = small(kv_heads=4, base_quant=base_quant)  # int4: every width a multiple of 64
  lo = setup_lib.build(c)
  state = lo.init_state()
  float_spec = ModelSpec.from_config(c.model)
  float_params = init(float_spec, c.train.seed)
  stored = quant.nbytes(state["frozen"]["blocks"])
  assert stored < (0.3 if base_quant == "int8" else 0.2) * quant.nbytes(float_params["blocks"])
  # the frozen base equals round-to-nearest of the float model: compare against its dequantized weights
  spec = ModelSpec.from_config(c.model, c.train.lora)
  trained = perturbed(state["params"])
  model_logits = logits(spec, lora.combine(trained, state["frozen"]))
  reference = jax.tree.map(lambda x: x, float_params)
  for parent, name, n_in in quant.BLOCK_WEIGHTS:
    group = reference["blocks"].get(parent[0], {})
    if name in group:
      w = np.asarray(group[name], np.float32)
      k = int(np.prod(w.shape[1:1 + n_in]))
      w2 = w.reshape(w.shape[0], k, -1)
      if base_quant == "int8":
        s = np.abs(w2).max(axis=1, keepdims=True) / 127
        deq = np.clip(np.round(w2 / s), -127, 127) * s
      else:
        g = w2.reshape(w2.shape[0], k // 64, 64, -1)
        lo_, hi_ = np.minimum(g.min(2, keepdims=True), 0), np.maximum(g.max(2, keepdims=True), 0)
        scale = (hi_ - lo_) / 15
        zero = np.round(-lo_ / scale)
        deq = (scale * (np.clip(np.round(g / scale) + zero, 0, 15) - zero)).reshape(w2.shape)
      group[name] = deq.reshape(w.shape)
  # the embedding (and untied head) are int8 rows in both formats (per vocabulary row / per output column)
  e = np.asarray(reference["embed"])
  s = np.abs(e).max(axis=1, keepdims=True) / 127
  reference["embed"] = np.clip(np.round(e / s), -127, 127) * s
  if "head" in reference:
    h = np.asarray(reference["head"])
    s = np.abs(h).max(axis=0, keepdims=True) / 127
    reference["head"] = np.clip(np.round(h / s), -127, 127) * s
  assert quant.nbytes(state["frozen"]) < 0.3 * quant.nbytes(float_params)
  ref_spec = dataclasses.replace(lora.base_spec(spec), lora_rank=spec.lora_rank, lora_alpha=spec.lora_alpha,
                                 lora_targets=spec.lora_targets)  # float base, same adapters
  ref_logits = logits(ref_spec, lora.combine(trained, jax.tree.map(jnp.asarray, reference)))
  np.testing.assert_allclose(model_logits, ref_logits, atol=2e-4)
  state, metrics = lo.train_step(state, random_batch(0))  # and it trains (gradients through the codes' matmul)
  assert np.isfinite(float(metrics["loss"]))


@pytest.mark.parametrize("key,value,message", [
    ("rank", -1, "train.lora.rank=-1 is invalid"),
    ("targets", "q,query", "must name one or more of q, k, v"),
    ("dropout", 1.0, "train.lora.dropout=1.0 is invalid"),
    ("base_quant", "nf3", "allowed values are none, int8, int4"),
    ("alpha", 0.0, "train.lora.alpha=0.0 is invalid"),
])
def test_bad_lora_settings_are_named(key, value, message):
  c = small()
  c.train.lora[key] = value
  with pytest.raises(ValueError, match=message):
    base.validate(c)
  with pytest.raises(ValueError, match="QLoRA needs adapters"):
    small(rank=0, base_quant="int8")


def test_lora_trains_with_fsdp_and_tensor_sharding_like_one_device():
  c = small(dropout=0.1)
  one = setup_lib.build(c)
  c2 = small(dropout=0.1)
  c2.mesh.update(data=1, fsdp=2, tensor=2)
  sharded = setup_lib.build(c2)
  s1, s2 = one.init_state(), sharded.init_state()
  for i in range(2):
    s1, m1 = one.train_step(s1, random_batch(i))
    s2, m2 = sharded.train_step(s2, random_batch(i))
  np.testing.assert_allclose(float(m1["loss"]), float(m2["loss"]), rtol=1e-5)
  for a, b in zip(jax.tree.leaves(s1["params"]), jax.tree.leaves(s2["params"])):
    np.testing.assert_allclose(a, b, atol=1e-5)


# -- PEFT -----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family,targets", [("llama", ALL), ("gpt", "q,k,o,mlp_in")])
def test_peft_reads_our_adapters_and_we_read_peft_adapters(family, targets, tmp_path):
  import peft as peft_lib

  c = small(family, targets=targets)
  spec, float_spec = ModelSpec.from_config(c.model, c.train.lora), ModelSpec.from_config(c.model)
  adapters, frozen = lora.split(init(spec))
  adapters = perturbed(adapters)
  ours = np.asarray(logits(spec, lora.combine(adapters, frozen)))
  hf.save_pretrained(transformer.from_params(float_spec, frozen), str(tmp_path / "base"))
  peft.save_adapter(spec, adapters, str(tmp_path / "adapter"))
  torch_base = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "base"), dtype=torch.float32)
  with torch.no_grad():
    theirs = peft_lib.PeftModel.from_pretrained(torch_base, str(tmp_path / "adapter"))(
        torch.tensor(np.asarray(X))).logits.numpy()
  np.testing.assert_allclose(theirs, ours, atol=1e-4)

  # the other way: an adapter PEFT made (random B, its own rank and alpha per module) read by us
  torch_base = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "base"), dtype=torch.float32)
  modules = ["q_proj", "v_proj", "down_proj"] if family == "llama" else ["c_attn", "mlp.c_proj"]
  config = peft_lib.LoraConfig(r=4, lora_alpha=16, target_modules=modules, init_lora_weights=False,
                               rank_pattern={modules[0]: 2}, alpha_pattern={modules[0]: 3})
  made = peft_lib.get_peft_model(torch_base, config)
  made.save_pretrained(str(tmp_path / "theirs"))
  with torch.no_grad():
    theirs = made(torch.tensor(np.asarray(X))).logits.numpy()
  lora_spec, read = peft.load_adapter(str(tmp_path / "theirs"), float_spec)
  ours = np.asarray(logits(lora_spec, lora.combine(read, frozen)))
  np.testing.assert_allclose(ours, theirs, atol=1e-4)
  assert float(np.abs(theirs - np.asarray(logits(float_spec, frozen))).max()) > 1e-2


# -- fine-tuning data -----------------------------------------------------------------------------------------------

def _write_jsonl(path, records):
  with open(path, "w", encoding="utf-8") as f:
    for r in records:
      f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")


def test_sft_records_train_only_on_answers(tiny_run, tmp_path):
  workdir, _ = tiny_run
  tokenizer_path = os.path.join(workdir, "tokenizer.json")
  tok = tokenizer_lib.load(tokenizer_path)
  template = sft.chat_template(tokenizer_path, tok)
  record = {"prompt": "def add(a, b):\n", "completion": "  return a + b\n"}
  (row,) = sft.tokenize_record(record, tokenizer=tok, template=template, seq_len=64)
  trained = row["targets"][row["mask"] > 0]
  assert list(trained) == tokenizer_lib.encode(tok, record["completion"]) + [tokenizer_lib.eot_id(tok)]
  assert tokenizer_lib.decode(tok, row["inputs"][1:(row["mask"] == 0).sum() + 1]) == record["prompt"]  # untrained

  chat = {"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "hello"},
                       {"role": "assistant", "content": "hi there"}, {"role": "user", "content": "bye"},
                       {"role": "assistant", "content": "see you"}]}
  (row,) = sft.tokenize_record(chat, tokenizer=tok, template=template, seq_len=256)
  eot = tokenizer_lib.decode(tok, [tokenizer_lib.eot_id(tok)])
  assert tokenizer_lib.decode(tok, row["targets"][row["mask"] > 0]) == f"hi there{eot}see you{eot}"

  # the template of a tokenizer_config.json beside the tokenizer is used
  own = tmp_path / "tok"
  own.mkdir()
  (own / "tokenizer.json").write_text(open(tokenizer_path).read())
  (own / "tokenizer_config.json").write_text(json.dumps({"chat_template": (
      "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}{% if m['role'] == 'assistant' %}"
      "{{ eos_token }}{% endif %}\n{% endfor %}{% if add_generation_prompt %}[assistant] {% endif %}")}))
  template = sft.chat_template(str(own / "tokenizer.json"), tok)
  (row,) = sft.tokenize_record(chat, tokenizer=tok, template=template, seq_len=256)
  assert tokenizer_lib.decode(tok, row["targets"][row["mask"] > 0]) == f"hi there{eot}see you{eot}"  # trim_blocks
  assert tokenizer_lib.decode(tok, row["inputs"]).startswith("[system] S[user] hello[assistant] ")  # no BOS added

  # batches: weights only on answers, records packed as segments
  path = tmp_path / "sft.jsonl"
  _write_jsonl(path, [record, chat] * 20)
  c = tiny_config(os.path.dirname(workdir), batch_size=4)
  c.data.update(source=f"sft:{path}", tokenizer_path=tokenizer_path, seq_len=64)
  sources = data_lib.load_sources(c)
  batch = next(data_lib.make_iterator(c, sources["train"], tok, split="train"))
  assert 0 < batch["weights"].sum() < 0.5 * (batch["segment_ids"] > 0).sum()
  assert set(np.unique(batch["targets"][batch["weights"] > 0])) <= set(
      tokenizer_lib.encode(tok, "  return a + b\nhi theresee you")) | {tokenizer_lib.eot_id(tok)}


def test_bad_sft_records_are_reported_with_their_line_numbers(tmp_path, caplog):
  path = tmp_path / "data.jsonl"
  _write_jsonl(path, [{"prompt": "a", "completion": "b"}, "{not json", {"prompt": "a"},
                      {"messages": [{"role": "user", "content": "x"}]}, {"messages": [{"role": "bot", "content": "x"}]},
                      {"prompt": "c", "completion": "d"}, {"prompt": "e", "completion": ""}])
  with caplog.at_level(logging.WARNING):
    splits = sft.read_records(str(path), 0.02, data_lib.split_of)
  assert {r["where"] for split in splits.values() for r in split} == {"data.jsonl:1", "data.jsonl:6"}  # the good ones
  assert splits["train"] and splits["validation"]  # a tiny file still gets a validation record
  text = caplog.text
  for line, why in ((2, "not JSON"), (3, "needs 'prompt' and 'completion'"), (4, "no assistant message"),
                    (5, "messages[0] must be"), (7, "empty completion")):
    assert f"data.jsonl:{line}: {why}" in text
  _write_jsonl(path, ["[]", "{}"])
  with pytest.raises(ValueError, match="no usable record"):
    sft.read_records(str(path), 0.02, data_lib.split_of)


# -- end to end: QLoRA on SFT data, resume, serving and export --------------------------------------------------------

def _read_losses(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return {r["step"]: r["loss"] for r in map(json.loads, f) if "loss" in r}


def test_qlora_fine_tuning_learns_resumes_bitwise_and_serves(tiny_run, tmp_path):
  base_run, _ = tiny_run
  path = tmp_path / "sft.jsonl"
  _write_jsonl(path, [{"prompt": f"x = {i}\n", "completion": f"y = x + {i % 3}\n"} for i in range(60)])

  def config():
    c = tiny_config(os.path.dirname(base_run), steps=12, log_every=1, eval_every=0, checkpoint_every=100,
                    warmup_steps=2, init_from=base_run, learning_rate=1e-2)
    c.data.update(source=f"sft:{path}", tokenizer_path=os.path.join(base_run, "tokenizer.json"))
    c.train.lora.update(rank=8, base_quant="int4", dropout=0.05)
    return base.validate(c)

  straight = str(tmp_path / "straight")
  summary = trainer.run(config(), straight)
  losses = _read_losses(straight)
  assert np.mean([losses[s] for s in (10, 11, 12)]) < losses[1] - 0.3, losses

  interrupted = str(tmp_path / "interrupted")

  def stop_at_5(step):
    if step == 5:
      os.kill(os.getpid(), signal.SIGTERM)

  assert trainer.run(config(), interrupted, on_step=stop_at_5)["interrupted"]
  trainer.run(config(), interrupted)
  assert _read_losses(interrupted) == losses  # bitwise: adapters, moments, dropout keys and data position restored

  # served as trained: the QLoRA run loads with its 4-bit base and adapters beside it
  _, model, _, _ = loading.load_trained(straight)
  assert model.spec.quant == "packed" and model.spec.lora_rank == 8
  assert abs(summary["eval_loss"] - _eval_loss(model, config())) < 1e-3

  # exported to PEFT: the adapters over the float base equal the run's adapters over it
  out = str(tmp_path / "peft")
  convert.export_peft(straight, out)
  _, with_peft, _, _ = loading.load_trained(base_run, adapter=out, merge_lora=False)
  _, float_lora, _, _ = loading.load_trained(base_run, adapter=straight, merge_lora=False)
  x = jnp.asarray(np.arange(32).reshape(2, 16) % 300, jnp.int32)
  np.testing.assert_allclose(with_peft(x), float_lora(x), atol=1e-4)

  # merged into the float base and exported for transformers: the same logits as the base with the adapter beside it
  merged_dir = str(tmp_path / "merged_hf")
  convert.export_hf(base_run, merged_dir, adapter=out)
  torch_model = transformers.AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32)
  with torch.no_grad():
    theirs = torch_model(torch.tensor(np.asarray(x))).logits.numpy()
  np.testing.assert_allclose(theirs, float_lora(x), atol=1e-4)


def _eval_loss(model, config):
  tok = tokenizer_lib.load(config.data.tokenizer_path)
  sources = data_lib.load_sources(config)
  graphdef, state = nnx.split(model)
  fn = step_lib.jit_eval_step(graphdef)
  return validation.validation_loss(fn, nnx.to_pure_dict(state), config, sources["validation"], tok)["eval_loss"]


def test_one_engine_serves_several_adapters_picked_per_request(tiny_run, tmp_path):
  c = small(targets="q,v,mlp_out")
  float_spec = ModelSpec.from_config(c.model)
  frozen = init(float_spec)
  paths, merged = [], []
  for i, (rank, targets) in enumerate([(4, "q,v,mlp_out"), (2, "k,o,mlp_in")]):
    cfg = small(rank=rank, targets=targets)
    spec = ModelSpec.from_config(cfg.model, cfg.train.lora)
    adapters = perturbed(lora.split(init(spec))[0], seed=i + 5, scale=0.3)
    paths.append(str(tmp_path / f"a{i}"))
    peft.save_adapter(spec, adapters, paths[-1])
    merged.append(transformer.from_params(float_spec, lora.merge(spec, lora.combine(adapters, frozen))))
  base_model = transformer.from_params(float_spec, frozen)
  banked = loading.with_adapter_bank(base_model, paths)
  assert banked.spec.lora_bank == 3 and banked.spec.lora_rank == 4
  prompts = [list((np.arange(6) * k + 3) % 128) for k in (1, 2, 3, 5)]  # one length: generate compiles once
  which = [0, 1, 2, 1]
  engine = Engine(banked, slots=4, page_size=16)
  slots = {engine.insert(p, SamplingParams(max_tokens=6, adapter=a)): i for i, (p, a) in enumerate(zip(prompts, which))}
  out = {i: [engine.prefill(slot)] for slot, i in slots.items()}
  for _ in range(5):
    for slot, tokens in engine.generate().items():
      out[slots[slot]].extend(tokens)
  references = [base_model, *merged]
  for i, (p, a) in enumerate(zip(prompts, which)):
    assert out[i] == generate.generate(references[a], [p], max_new_tokens=6)[0], (i, a)
  assert len({tuple(out[1]), tuple(out[0])}) == 2  # the adapters change the continuation
  with pytest.raises(ValueError, match="holds 2 LoRA adapters"):
    engine.insert(prompts[0], SamplingParams(max_tokens=2, adapter=3))

  # the server maps the request's `model` to the adapter, and lists every model id
  tok = tokenizer_lib.load(os.path.join(tiny_run[0], "tokenizer.json"))
  srv = Server(Scheduler(engine, str), tok, "base", None, adapter_ids=("first", "second"))
  assert srv.parse({"model": "second", "prompt": [1, 2, 3]})[1].adapter == 2
  assert srv.parse({"prompt": [1, 2, 3]})[1].adapter == 0
  with pytest.raises(BadRequest, match="'third' does not exist"):
    srv.parse({"model": "third", "prompt": [1, 2, 3]})


def test_accumulation_and_remat_give_the_plain_lora_step_and_the_planner_counts_the_frozen_base():
  plain = setup_lib.build(small())
  c = small()
  c.train.grad_accum_steps = 2
  c.model.remat = "full"
  accumulated = setup_lib.build(base.validate(c))
  s1, m1 = plain.train_step(plain.init_state(), random_batch(3))
  s2, m2 = accumulated.train_step(accumulated.init_state(), random_batch(3))
  np.testing.assert_allclose(float(m1["loss"]), float(m2["loss"]), rtol=1e-5)
  for a, b in zip(jax.tree.leaves(s1["params"]), jax.tree.leaves(s2["params"])):
    np.testing.assert_allclose(a, b, atol=1e-6)
  full, lo = plan_lib.plan(small(rank=0)), plan_lib.plan(small())
  assert lo["frozen"] == full["params"] and full["frozen"] == 0
  assert lo["grads"] < 0.2 * full["grads"] and lo["optimizer"] < 0.2 * full["optimizer"]
