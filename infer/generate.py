"""Text generation with a KV cache: batched, left-padded prompts, one prefill, and the whole decode in one jitted loop.

Usage:
  python -m infer.generate --workdir=DIR --prompt="def fib(" [--prompt=...] --max_new_tokens=64 \
      [--temperature=0.8 --top_k=50 --top_p=0.95 --seed=0]

Sampling flags that are not given default to the run's `config.sample` section.
"""

from __future__ import annotations

import functools
import logging
import sys
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from flax import nnx

from configs import base
from infer import loading
from infer import sampling
from infer import speculative
from model import offload
from infer.sampling import SamplingParams
from workdir import tokenizer as tokenizer_lib
from workdir.tokenizer import decode_completion, encode_document
from train import allocator


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens"))
def _generate_padded(graphdef, state, tokens, positions, segment_ids, lengths, settings, eos_id, *,
                     max_new_tokens: int):
  """Prefill + decode loop. tokens/positions/segment_ids [B, P] int32 (left-padded), lengths [B] int32, settings:
  `sampling.row_settings` arrays [B], eos_id [] int32 (-1 = none). Returns (new tokens [B, max_new_tokens] int32,
  number of decode steps run [] int32). Token i of a row is drawn with counter i (see `sampling.sample`)."""
  model = nnx.merge(graphdef, state).unstacked()  # per-layer weights sliced once, not at every decode step
  b, p = tokens.shape
  sample = lambda logits, i: sampling.sample(logits, counters=jnp.full((b,), i, jnp.int32), **settings)  # noqa: E731
  cache = model.init_cache(b, p + max_new_tokens, per_layer=True)  # updated in place at every step
  logits, cache = model.extend(tokens, positions, segment_ids, cache)
  first = sample(logits[:, -1], 0)
  out = jnp.zeros((b, max_new_tokens), jnp.int32).at[:, 0].set(first)
  done = first == eos_id
  ones = jnp.ones((b, 1), jnp.int32)

  def cond(carry):
    i, _, _, _, done = carry
    return (i < max_new_tokens) & ~jnp.all(done)

  def body(carry):
    i, last, cache, out, done = carry  # i tokens generated so far; `last` is token i-1 at position length+i-1
    logits, cache = model.extend(last[:, None], (lengths + i - 1)[:, None], ones, cache)
    nxt = jnp.where(done, jnp.maximum(eos_id, 0), sample(logits[:, 0], i))
    out = jax.lax.dynamic_update_slice(out, nxt[:, None], (0, i))
    return i + 1, nxt, cache, out, done | (nxt == eos_id)

  steps, _, _, out, _ = jax.lax.while_loop(cond, body, (jnp.int32(1), first, cache, out, done))
  return out, steps


def _prepare(model, prompts: Sequence[Sequence[int]], max_new_tokens: int, temperature: float, top_k: int,
             top_p: float, seed: int, eos_id: int | None):
  """Validates the request and left-pads the prompts. Returns (args, kwargs) for `_generate_padded`. Row b samples
  as a request with seed `seed + b` does in the serving engine (as the server seeds the n copies of a prompt)."""
  if not prompts or any(len(p) == 0 for p in prompts):
    raise ValueError("generate needs at least one prompt and every prompt needs at least one token")
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 1")
  rows = [SamplingParams(max_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                         seed=(seed + b) % 2**31).validate() for b in range(len(prompts))]
  spec = model.spec
  b, p = len(prompts), max(len(x) for x in prompts)
  if p + max_new_tokens > spec.max_len:
    raise ValueError(f"longest prompt ({p} tokens, counting a leading <|endoftext|> if the prompt has one) + "
                     f"max_new_tokens ({max_new_tokens}) = {p + max_new_tokens} "
                     f"exceeds the model's max_len={spec.max_len}")
  tokens = np.zeros((b, p), np.int32)
  positions = np.zeros((b, p), np.int32)
  segment_ids = np.zeros((b, p), np.int32)
  for row, prompt in enumerate(prompts):
    n = len(prompt)
    tokens[row, p - n:] = np.asarray(prompt, np.int32)
    positions[row, p - n:] = np.arange(n)
    segment_ids[row, p - n:] = 1
  lengths = np.asarray([len(x) for x in prompts], np.int32)
  graphdef, state = nnx.split(model)
  eos = np.int32(-1 if eos_id is None else eos_id)
  args = (graphdef, state, tokens, positions, segment_ids, lengths, sampling.row_settings(rows), eos)
  return args, dict(max_new_tokens=int(max_new_tokens))


def _cut(out: np.ndarray, eos_id: int | None) -> list[list[int]]:
  rows = []
  for row in np.asarray(out).tolist():
    if eos_id is not None and eos_id in row:
      row = row[:row.index(eos_id) + 1]
    rows.append(row)
  return rows


SPECULATE = speculative.SPECULATE
_DYNAMIC = ("draft_state",)  # arguments of the speculative program that are arrays, not compile-time settings


def _decoder(speculate: str, draft_tokens: int, ngram: int, draft_model=None, model=None):
  """The jitted decode program for `speculate`, with its settings bound; ValueError names a bad one."""
  speculative.check_settings(speculate, draft_tokens, ngram, draft_model, model)
  if speculate == "none":
    return _generate_padded
  if speculate == "lookup":
    return functools.partial(speculative.generate_speculative, draft_tokens=draft_tokens, ngram=ngram)
  draft_graphdef, draft_state = nnx.split(draft_model)
  return functools.partial(speculative.generate_speculative, draft_tokens=draft_tokens, ngram=ngram,
                           draft_graphdef=draft_graphdef, draft_state=draft_state)


def generate(model, prompts: Sequence[Sequence[int]], *, max_new_tokens: int, temperature: float = 0.0,
             top_k: int = 0, top_p: float = 1.0, seed: int = 0, eos_id: int | None = None, speculate: str = "none",
             draft_tokens: int = 4, ngram: int = 3, draft_model=None) -> list[list[int]]:
  """Continues each prompt (a list of token ids; lengths may differ) by up to `max_new_tokens` tokens.

  Prompts are left-padded to the longest, prefilled in one `extend` call, and decoded in one jitted `while_loop`
  (compiled once per batch size, padded prompt length, max_new_tokens and sampling settings). Returns the new tokens
  of each row as Python ints, cut after the first `eos_id` (which is included); the loop stops once every row has
  produced it. Deterministic for a given `seed`. ValueError if padded prompt length + max_new_tokens > max_len.
  Speculation (`infer/speculative.py`; greedy output identical, sampled output distributed as ordinary decoding's):
  `speculate="lookup"` verifies `draft_tokens` drafts per model call copied from n-grams of up to `ngram` tokens of
  the context; `speculate="draft"` takes them from `draft_model` (same vocabulary).
  """
  decode = _decoder(speculate, draft_tokens, ngram, draft_model, model)
  args, kwargs = _prepare(model, prompts, max_new_tokens, temperature, top_k, top_p, seed, eos_id)
  out = decode(*args, **kwargs)[0]
  return _cut(jax.device_get(out), eos_id)


def generate_text(model, tokenizer, prompts: Sequence[str], *, max_new_tokens: int, temperature: float = 0.0,
                  top_k: int = 0, top_p: float = 1.0, seed: int = 0) -> list[str]:
  """Completions (new text only, EOT not included) of each prompt string; a row stops at `<|endoftext|>`."""
  ids = generate(model, [encode_document(tokenizer, p) for p in prompts], max_new_tokens=max_new_tokens,
                 temperature=temperature, top_k=top_k, top_p=top_p, seed=seed, eos_id=tokenizer_lib.eot_id(tokenizer))
  return [decode_completion(tokenizer, row) for row in ids]


def closing_sample(model, tokenizer, config) -> str:
  """The prompt of `config.sample` and its continuation by `model` with that section's settings (seed
  train.seed), as the trainer prints at the end of a run; "" when sample.max_new_tokens is 0."""
  s = config.sample
  if s.max_new_tokens == 0:
    return ""
  room = model.spec.max_len - len(encode_document(tokenizer, s.prompt))
  if room < 1:
    logging.getLogger("peakllm.generate").warning("sample.prompt is %d tokens; no room to sample within "
                                                  "model.max_len=%d", model.spec.max_len - room, model.spec.max_len)
    return s.prompt
  (text,) = generate_text(model, tokenizer, [s.prompt], max_new_tokens=min(s.max_new_tokens, room),
                          temperature=s.temperature, top_k=s.top_k, top_p=s.top_p, seed=config.train.seed)
  return s.prompt + text


# -- command line ---------------------------------------------------------------------------------------------------


def _define_flags():
  # Defined only when run as a script so importing this module never clashes with other programs' flags.
  flags.DEFINE_string("workdir", None, "Training run directory (config, checkpoints, tokenizer.json).")
  flags.DEFINE_multi_string("prompt", None, "Prompt text; repeat for a batch. Default: config.sample.prompt.")
  flags.DEFINE_integer("max_new_tokens", None, "Tokens to generate. Default: config.sample.max_new_tokens.")
  flags.DEFINE_float("temperature", None, "0 is greedy. Default: config.sample.temperature.")
  flags.DEFINE_integer("top_k", None, "0 disables. Default: config.sample.top_k.")
  flags.DEFINE_float("top_p", None, "1 disables. Default: config.sample.top_p.")
  flags.DEFINE_integer("seed", 0, "Sampling seed.")
  flags.DEFINE_integer("step", None, "Checkpoint step to load (default: latest).")
  flags.DEFINE_enum("matmul_impl", None, list(base.MATMUL_IMPLS), "Override model.matmul_impl (pallas on a QMoE workdir: "
                    "experts decoded inside the fused kernel).")
  flags.DEFINE_string("adapter", None, "A LoRA adapter over --workdir: a PEFT directory (adapter_config.json) or a "
                      "LoRA training run; merged into float bases at load.")
  flags.DEFINE_enum("head_quant", None, list(base.HEAD_QUANTS), "Serve a packed compressed workdir's float embedding and head as int8 rows (smaller, faster; not lossless).")
  flags.DEFINE_enum("speculate", "none", list(SPECULATE), "lookup: prompt-lookup speculative decoding (drafts copied "
                    "from the context, verified in one model call; same greedy output).")
  flags.DEFINE_integer("draft_tokens", 4, "--speculate=lookup: drafts verified per model call.")
  flags.DEFINE_integer("ngram", 3, "--speculate=lookup: the longest context suffix looked up.")
  flags.DEFINE_string("draft_workdir", None, "--speculate=draft: a smaller run trained with the same tokenizer.")
  flags.DEFINE_enum("offload", "none", list(offload.OFFLOADS), "Keep each layer's weights and/or the KV cache in host "
                    "memory, streamed to the device layer by layer (model/offload.py).")
  flags.DEFINE_bool("offload_ahead", True, "With --offload=weights[,kv]: copy layer i + 1 in while layer i computes "
                    "(false: one layer in flight, fewer device bytes, no overlap with the previous layer).")
  flags.mark_flag_as_required("workdir")


def main(argv):
  if len(argv) > 1:
    sys.exit(f"error: unexpected arguments {argv[1:]}")
  f = flags.FLAGS
  try:
    config, model, tokenizer, step = loading.load_trained(f.workdir, f.step, f.matmul_impl, head_quant=f.head_quant,
                                                          adapter=f.adapter)
  except (FileNotFoundError, ValueError) as e:
    sys.exit(f"error: cannot load --workdir={f.workdir}: {e}")
  s = config.sample
  pick = lambda value, default: default if value is None else value  # noqa: E731
  prompts = f.prompt or [s.prompt]
  settings = dict(max_new_tokens=pick(f.max_new_tokens, s.max_new_tokens), temperature=pick(f.temperature,
                  s.temperature), top_k=pick(f.top_k, s.top_k), top_p=pick(f.top_p, s.top_p), seed=f.seed)
  eos = tokenizer_lib.eot_id(tokenizer)
  draft_model = None
  if f.draft_workdir:
    try:
      draft_model = loading.load_trained(f.draft_workdir)[1]
    except (FileNotFoundError, ValueError) as e:
      sys.exit(f"error: cannot load --draft_workdir={f.draft_workdir}: {e}")
  try:
    model = offload.place(model, f.offload, ahead=f.offload_ahead)
    decode = _decoder(f.speculate, f.draft_tokens, f.ngram, draft_model, model)
    args, kwargs = _prepare(model, [encode_document(tokenizer, p) for p in prompts], eos_id=eos, **settings)
  except ValueError as e:
    sys.exit(f"error: {e}")
  rows, stats = _timed_generate(decode, args, kwargs, eos)
  placed = "" if f.offload == "none" else f"; offloaded ({f.offload}): {offload.resident_bytes(model)} bytes by memory kind"
  print(f"step {step} of {f.workdir}; {loading.weights_note(model)}{placed}; {settings}")
  for prompt, row in zip(prompts, rows):
    print("-" * 80)
    print(prompt + decode_completion(tokenizer, row))
  print("-" * 80)
  print(f"{stats['tokens']} new tokens in {stats['seconds']:.3f} s ({stats['tokens_per_s']:.1f} tokens/s; batch "
        f"{len(rows)}, {stats['steps']} model calls incl. prefill; compile {stats['compile_s']:.1f} s)")


def _timed_generate(decode, args, kwargs, eos_id):
  """Compiles `decode` (`_decoder`) ahead of time, then times one run. Returns (rows, stats dict)."""
  jitted = decode.func if isinstance(decode, functools.partial) else decode
  bound = decode.keywords if isinstance(decode, functools.partial) else {}
  dynamic = {k: v for k, v in bound.items() if k in _DYNAMIC}
  t0 = time.perf_counter()
  compiled = jitted.lower(*args, **kwargs, **bound).compile()
  t1 = time.perf_counter()
  out, steps = jax.block_until_ready(compiled(*args[1:], **dynamic))[:2]  # static settings are compiled in
  t2 = time.perf_counter()
  rows = _cut(jax.device_get(out), eos_id)
  n = sum(len(r) for r in rows)
  return rows, dict(tokens=n, seconds=t2 - t1, tokens_per_s=n / max(t2 - t1, 1e-9), steps=int(steps),
                    compile_s=t1 - t0)


if __name__ == "__main__":
  allocator.reexec_with_tcmalloc("infer.generate")  # XLA CPU temporaries without page faults (train/allocator.py)
  _define_flags()
  app.run(main)
