"""Decode benchmark: tokens/s of greedy generation (prefill included) and time to first token, against the memory
bandwidth roofline.

For each model shape (shape S and GPT-2 124M, random weights), batch size and weight format (float32, bfloat16,
int8 weight-only, int8 W8A8, and the packed b-bit codes of `infer.compress` as `gptq<b>`: round-to-nearest codes of the
random weights, group 128, served as stored; decode speed does not depend on how the codes were chosen; with the
suffix `_int8head` the embedding and head are int8 rows too, as `--head_quant=int8` serves them), runs
`infer.generate`'s single jitted prefill + decode loop with a 32-token prompt and 128 new tokens. The roofline assumes every decode step reads all weights once plus the live KV cache:
tokens/s <= batch * bandwidth / bytes_per_step, with the copy bandwidth measured in the same run (a donated
elementwise pass over 256 MiB, counting bytes read and written). In the same run, the HF-PyTorch peer
(`GPT2LMHeadModel.generate`, greedy, KV cache, float32, 2 threads, same shapes, prompts and token counts) gives the
ratio column. Prints a table and writes JSON.

  python -m scripts.bench_decode [--shapes=shape_s,gpt2_124m] [--batches=1,8]
      [--formats=float32,bfloat16,int8,w8a8,gptq4,gptq4_int8head,gptq3] [--matmul_impl=auto] [--nopeer] [--profile=DIR]

With `--offload=weights` (repeatable: `--offload=none --offload=weights --offload=weights,kv`) each case also runs
with its per-layer weights (and KV cache) in host memory, streamed to the device layer by layer (`model/offload.py`),
and reports the bytes moved host -> device (and back, for the cache) per generated token.

With `--speculate_workdir=DIR` (a trained run) it measures prompt-lookup speculation instead (`infer/speculative.py`):
greedy tokens/s at batch 1 with and without it on prompts cut from the run's validation split (code, for the
default corpus), per draft length, with the model calls per token and whether every output was identical.

  python -m scripts.bench_decode --speculate_workdir=runs/default [--draft_workdir=runs/draft]
      [--draft_tokens=1,2,4,8] [--speculate_prompts=8]
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from flax import nnx

from infer import evaluate, generate, loading, speculative
from infer.compress import gptq, storage
from model import offload, quant, transformer
from model.transformer import ModelSpec, Transformer
from scripts import torch_peer
from scripts.bench_train import cpu_description
from train import allocator
from train import profiling

_SHAPES = flags.DEFINE_list("shapes", ["shape_s", "gpt2_124m"], "Config modules under configs/.")
_BATCHES = flags.DEFINE_list("batches", ["1", "8"], "Batch sizes.")
_FORMATS = flags.DEFINE_list("formats", ["float32", "bfloat16", "int8", "w8a8", "gptq4", "gptq4_int8head", "gptq3"],
                             "Weight formats.")
_IMPL = flags.DEFINE_enum("matmul_impl", "auto", ["auto", "xla", "native"], "How quantized matmuls run.")
_PROMPT = flags.DEFINE_integer("prompt_len", 32, "Prompt tokens.")
_NEW = flags.DEFINE_integer("new_tokens", 128, "Generated tokens.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed runs per case (median).")
_OUT = flags.DEFINE_string("out", "bench_decode.json", "Where to write the JSON results.")
_PROFILE = flags.DEFINE_string("profile", "", "A directory: trace one generate call of each case there "
                                "(TensorBoard/Perfetto) and print its top operations.")
_PEER = flags.DEFINE_bool("peer", True, "Also measure HF-PyTorch `generate` (needs the test extra).")
_OFFLOAD = flags.DEFINE_multi_enum("offload", ["none"], list(offload.OFFLOADS), "Offload settings to measure "
                                   "(repeatable; none is the resident model).")
_OFFLOAD_AHEAD = flags.DEFINE_bool("offload_ahead", True, "Offloaded weights: copy layer i + 1 in while layer i "
                                   "computes (model/offload.py); false: one layer in flight.")
_SPEC_WORKDIR = flags.DEFINE_string("speculate_workdir", "", "A trained run: measure prompt-lookup speculation on "
                                    "prompts from its validation split instead of the format table.")
_DRAFTS = flags.DEFINE_list("draft_tokens", ["1", "2", "4", "8"], "--speculate_workdir: draft lengths to measure.")
_NGRAM = flags.DEFINE_integer("ngram", 3, "--speculate_workdir: the longest context suffix looked up.")
_SPEC_PROMPTS = flags.DEFINE_integer("speculate_prompts", 8, "--speculate_workdir: prompts (each decoded at batch 1).")
_DRAFT_WORKDIR = flags.DEFINE_string("draft_workdir", "", "--speculate_workdir: also measure draft-model speculation "
                                     "with this smaller run (trained with the same tokenizer) as the draft.")
_SPEC_PROMPT_LEN = flags.DEFINE_integer("speculate_prompt_len", 128, "--speculate_workdir: tokens per prompt.")


def copy_bandwidth(mib: int = 256, repeats: int = 5) -> float:
  """Bytes/s of a donated elementwise pass (read + write) over `mib` MiB of float32."""
  x = jnp.ones((mib * 2**20 // 4,), jnp.float32)
  step = jax.jit(lambda a: a * 1.0001, donate_argnums=0)
  x = step(x).block_until_ready()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    x = step(x).block_until_ready()
    times.append(time.perf_counter() - start)
  return 2 * x.nbytes / min(times)


INT8_HEAD = "_int8head"  # format suffix: a packed model's embedding and head as int8 rows


def build_model(shape: str, fmt: str, matmul_impl: str = "auto") -> Transformer:
  """A random-weight model of configs/<shape>.py in `fmt`: float32, bfloat16 (params and compute), int8 (W8A16),
  w8a8 (int8 weights and per-token int8 activations, int32 sums), gptq<bits> (packed codes, group 128; float32
  embedding and head) or gptq<bits>_int8head (the same with an int8 embedding and head)."""
  cfg = importlib.import_module(f"configs.{shape}").get_config()
  spec = dataclasses.replace(ModelSpec.from_config(cfg.model), remat="none", param_dtype="float32",
                             dtype="float32", attention_impl="xla", matmul_impl=matmul_impl)
  if fmt == "bfloat16":
    spec = dataclasses.replace(spec, param_dtype="bfloat16", dtype="bfloat16")
  model = Transformer(spec, rngs=nnx.Rngs(params=0))
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  if fmt in ("int8", "w8a8"):
    stats = {norm: jnp.ones((spec.num_layers, spec.embed_dim)) for norm in quant.SMOOTHED}  # random weights: flat
    qspec, qparams = quant.quantize_model_params(spec, params, "int8_weight" if fmt == "int8" else "w8a8", stats)
    model = transformer.from_params(qspec, qparams)
  elif fmt.startswith("gptq") and fmt.removesuffix(INT8_HEAD)[4:] in ("2", "3", "4", "8"):
    model = _packed_model(spec, params, int(fmt.removesuffix(INT8_HEAD)[4:]), 128, fmt.endswith(INT8_HEAD))
  elif fmt not in ("float32", "bfloat16"):
    raise ValueError(f"--formats: unknown format {fmt!r}; use float32, bfloat16, int8, w8a8, gptq<2|3|4|8> or "
                     f"gptq<2|3|4|8>{INT8_HEAD}")
  return model


def _packed_model(spec: ModelSpec, params: dict, bits: int, group_size: int, int8_head: bool) -> Transformer:
  """Every block weight as round-to-nearest b-bit codes (the grids of `infer.compress`), served packed; the embedding
  and head float32, or int8 rows with `int8_head` (`--head_quant=int8` of infer.generate)."""
  pspec = dataclasses.replace(spec, quant="packed", quant_bits=bits, quant_group_size=group_size,
                              head_quant="int8" if int8_head else "none")
  blocks = params["blocks"]
  for parent, name, n_in in quant.BLOCK_WEIGHTS:
    if name not in blocks[parent[0]]:
      continue
    w = np.asarray(blocks[parent[0]][name])
    out_shape = w.shape[1 + n_in:]
    flat = w.reshape(w.shape[0], -1, int(np.prod(out_shape)))
    layers = [gptq.rtn_layer(jnp.asarray(layer), bits=bits, group_size=group_size) for layer in flat]
    blocks[parent[0]][name], blocks[parent[0]][name + "_scale"] = storage.packed_weight(
        np.stack([np.asarray(r.codes) for r in layers]), np.stack([np.asarray(r.scale) for r in layers]),
        np.stack([np.asarray(r.zero) for r in layers]), bits, out_shape)
  return transformer.from_params(pspec, quant.quantize_head(params, spec.tie_embeddings) if int8_head else params)


def time_generate(model, batch: int, prompt_len: int, new_tokens: int, repeats: int, profile_dir: str = "") -> float:
  """Median seconds of `infer.generate`'s jitted program (compiled first); `profile_dir`: also trace one more call
  there and print its top operations (train/profiling.py)."""
  prompts = np.random.default_rng(0).integers(1, model.spec.vocab_size, (batch, prompt_len)).tolist()
  args, kwargs = generate._prepare(model, prompts, new_tokens, 0.0, 0, 1.0, 0, None)
  fn = generate._generate_padded  # the one jitted prefill + decode program that `generate` runs
  jax.block_until_ready(fn(*args, **kwargs))
  if profile_dir:
    with profiling.trace(profile_dir) as timing:
      jax.block_until_ready(fn(*args, **kwargs))
    print(profiling.summarize(profile_dir, timing["wall_s"]).table(steps=new_tokens) + "  (per new token)", flush=True)
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args, **kwargs))
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def _best_seconds(fn, args, kwargs, repeats: int):
  """(fastest of `repeats` timed calls after a warm-up, the last outputs): the VM's noise only ever adds time."""
  out = jax.block_until_ready(fn(*args, **kwargs))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    out = jax.block_until_ready(fn(*args, **kwargs))
    times.append(time.perf_counter() - start)
  return min(times), out


def speculation_rows(workdir: str, prompts: int, prompt_len: int, new_tokens: int, draft_lengths, ngram: int,
                     repeats: int, draft_workdir: str = "") -> list[dict]:
  """Greedy batch-1 decoding of `prompts` windows of the validation split, ordinary and with prompt lookup (and with
  the draft model of `draft_workdir`) at each draft length: summed tokens/s (fastest of `repeats` per prompt),
  target-model calls per token, identical outputs."""
  config, model, tokenizer, _ = loading.load_trained(workdir)
  model = model.unstacked()
  stream = evaluate.validation_stream(config, tokenizer, prompts * (prompt_len + new_tokens) * 2)
  stride = len(stream) // prompts
  windows = [stream[i * stride:i * stride + prompt_len].tolist() for i in range(prompts)]
  cases = [("greedy", generate._generate_padded, {})] + [
      (f"lookup k={k}", speculative.generate_speculative, {"draft_tokens": k, "ngram": ngram}) for k in draft_lengths]
  if draft_workdir:
    draft_graphdef, draft_state = nnx.split(loading.load_trained(draft_workdir)[1].unstacked())
    cases += [(f"draft k={k}", speculative.generate_speculative,
               {"draft_tokens": k, "draft_graphdef": draft_graphdef, "draft_state": draft_state})
              for k in draft_lengths]
  rows, reference = [], []
  for name, fn, extra in cases:
    seconds, calls, outputs = 0.0, 0, []
    for prompt in windows:
      args, kwargs = generate._prepare(model, [prompt], new_tokens, 0.0, 0, 1.0, 0, None)
      best, out = _best_seconds(fn, args, {**kwargs, **extra}, repeats)
      seconds += best
      calls += int(out[1])
      outputs.append(np.asarray(out[0]).tolist())
    reference = reference or outputs
    row = {"workdir": workdir, "case": name, "batch": 1, "prompts": prompts, "prompt_len": prompt_len,
           "new_tokens": new_tokens, "tokens_per_s": prompts * new_tokens / seconds,
           "model_calls_per_token": calls / (prompts * new_tokens), "identical_to_greedy": outputs == reference}
    row["speedup"] = row["tokens_per_s"] / rows[0]["tokens_per_s"] if rows else 1.0
    rows.append(row)
    print(f"{name:<12} {row['tokens_per_s']:9,.1f} tokens/s  {row['speedup']:5.2f}x  "
          f"{row['model_calls_per_token']:.3f} calls/token  identical: {row['identical_to_greedy']}", flush=True)
  return rows


def main(argv):
  del argv
  if _SPEC_WORKDIR.value:
    print(f"{cpu_description()}; prompt lookup on {_SPEC_WORKDIR.value}'s validation split, batch 1, greedy")
    rows = speculation_rows(_SPEC_WORKDIR.value, _SPEC_PROMPTS.value, _SPEC_PROMPT_LEN.value, _NEW.value,
                            [int(k) for k in _DRAFTS.value], _NGRAM.value, _REPEATS.value, _DRAFT_WORKDIR.value)
    with open(_OUT.value, "w", encoding="utf-8") as f:
      json.dump({"cpu": cpu_description(), "device": jax.devices()[0].device_kind, "rows": rows}, f, indent=2)
    return
  bandwidth = copy_bandwidth()
  device = jax.devices()[0].device_kind
  print(f"{cpu_description()}; device {device}; copy bandwidth {bandwidth / 1e9:.1f} GB/s (read + write)")
  print(f"{'shape':<10} {'format':<9} {'batch':>5} {'tokens/s':>9} {'TTFT ms':>8} {'roofline':>9} {'of roof':>7} "
        f"{'weights MB':>10} {'vs peer':>7}")
  rows = []
  peers = {}
  for shape in _SHAPES.value:
    if _PEER.value and torch_peer.available():
      spec = ModelSpec.from_config(importlib.import_module(f"configs.{shape}").get_config().model)
      for batch in map(int, _BATCHES.value):
        peer = torch_peer.generate_tokens_per_sec(spec, batch, _PROMPT.value, _NEW.value, repeats=_REPEATS.value)
        peers[(shape, batch)] = peer
        rows.append({"shape": shape, "format": "HF-PyTorch float32", "batch": batch, **peer})
        print(f"{shape:<10} {'HF f32':<9} {batch:>5} {peer['tokens_per_s']:9,.0f} {peer['ttft_s'] * 1e3:8.1f}",
              flush=True)
    for fmt in _FORMATS.value:
      stacked = build_model(shape, fmt, _IMPL.value)
      model = stacked.unstacked()  # per-layer weights once, as a server holds them (else every
      # generate call would slice the stacked weights again: 0.1-0.4 s of copies counted in its first token)
      weight_bytes = quant.nbytes(nnx.state(model, nnx.Param))  # every weight is read once per decode step
      s = model.spec
      kv_bytes_per_token = 2 * s.num_layers * s.num_kv_heads * s.head_dim * jnp.dtype(s.compute_dtype).itemsize
      block_bytes = quant.nbytes(nnx.state(model.blocks, nnx.Param))  # what offloading weights streams per step
      for placement in _OFFLOAD.value:
        placed = model if placement == "none" else offload.place(stacked, placement, ahead=_OFFLOAD_AHEAD.value)
        name = fmt if placement == "none" else f"{fmt}+off({placement})"
        for batch in map(int, _BATCHES.value):
          profile_dir = os.path.join(_PROFILE.value, f"{shape}-{fmt}-b{batch}") if _PROFILE.value else ""
          total = time_generate(placed, batch, _PROMPT.value, _NEW.value, _REPEATS.value, profile_dir)
          ttft = time_generate(placed, batch, _PROMPT.value, 1, _REPEATS.value)
          tokens_per_s = batch * _NEW.value / total
          avg_context = _PROMPT.value + _NEW.value / 2
          bytes_per_step = weight_bytes + batch * avg_context * kv_bytes_per_token
          roofline = batch * bandwidth / bytes_per_step
          moved = offload.parts(placement)
          moved_per_step = (block_bytes if "weights" in moved else 0) + (
              2 * batch * avg_context * kv_bytes_per_token if "kv" in moved else 0)  # the cache goes both ways
          peer = peers.get((shape, batch))
          row = {"shape": shape, "format": fmt, "offload": placement, "batch": batch, "tokens_per_s": tokens_per_s,
                 "offload_ahead": _OFFLOAD_AHEAD.value if placement != "none" else None,
                 "ttft_s": ttft, "total_s": total, "weight_bytes": weight_bytes, "roofline_tokens_per_s": roofline,
                 "fraction_of_roofline": tokens_per_s / roofline,
                 "offload_bytes_per_token": moved_per_step / batch,
                 "ratio_to_peer": tokens_per_s / peer["tokens_per_s"] if peer else None}
          rows.append(row)
          ratio = f"{row['ratio_to_peer']:6.2f}x" if peer else ""
          print(f"{shape:<10} {name:<9} {batch:>5} {tokens_per_s:9,.0f} {ttft * 1e3:8.1f} {roofline:9,.0f} "
                f"{row['fraction_of_roofline']:7.1%} {weight_bytes / 1e6:10.1f} {ratio:>7}"
                + (f"  moved {moved_per_step / batch / 1e6:.1f} MB/token" if moved else ""), flush=True)
  with open(_OUT.value, "w", encoding="utf-8") as f:
    json.dump({"cpu": cpu_description(), "device": device, "copy_bandwidth_bytes_per_s": bandwidth, "rows": rows}, f,
              indent=2)


if __name__ == "__main__":
  allocator.reexec_with_tcmalloc("scripts.bench_decode")  # XLA CPU temporaries without page faults (train/allocator.py)
  app.run(main)
