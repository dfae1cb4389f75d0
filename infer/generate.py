"""Text generation with a KV cache: batched, left-padded prompts, one prefill, and the whole decode in one jitted loop.

Usage:
  python -m infer.generate --workdir=DIR --prompt="def fib(" [--prompt=...] --max_new_tokens=64 \
      [--temperature=0.8 --top_k=50 --top_p=0.95 --seed=0]

Sampling flags that are not given default to the run's `config.sample` section.
"""

from __future__ import annotations

import functools
import sys
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from train.tokenizer import EOT, bos_id, decode, encode, eot_id  # noqa: F401  (EOT: prompts start with it; a row stops at it)



def sample_logits(logits: jax.Array, key: jax.Array, *, temperature: float, top_k: int = 0,
                  top_p: float = 1.0) -> jax.Array:
  """Draws one token per row. logits [B, V] float -> [B] int32.

  temperature == 0 is greedy (argmax; key, top_k and top_p unused). Otherwise logits are divided by `temperature`,
  then restricted to the `top_k` largest (0 = off), then to the nucleus: the smallest set of most likely tokens whose
  probability reaches `top_p` (1.0 = off; the top token is always kept). Ties at a cut-off are kept. Jittable with
  temperature/top_k/top_p static.
  """
  if temperature == 0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits.astype(jnp.float32) / temperature
  vocab = logits.shape[-1]
  if 0 < top_k < vocab:
    kth = jax.lax.top_k(logits, top_k)[0][:, -1:]  # [B, 1]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  if top_p < 1.0:
    sorted_logits = -jnp.sort(-logits, axis=-1)  # descending
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs  # probability of the strictly more likely tokens
    keep = jnp.sum(mass_before < top_p, axis=-1, keepdims=True)  # >= 1: mass_before of the top token is 0
    threshold = jnp.take_along_axis(sorted_logits, keep - 1, axis=-1)  # [B, 1] smallest kept logit
    logits = jnp.where(logits < threshold, -jnp.inf, logits)
  return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "temperature", "top_k", "top_p"))
def _generate_padded(graphdef, state, tokens, positions, segment_ids, lengths, key, eos_id, *, max_new_tokens: int,
                     temperature: float, top_k: int, top_p: float):
  """Prefill + decode loop. tokens/positions/segment_ids [B, P] int32 (left-padded), lengths [B] int32, eos_id []
  int32 (-1 = none). Returns (new tokens [B, max_new_tokens] int32, number of decode steps run [] int32)."""
  model = nnx.merge(graphdef, state).unstacked()  # per-layer weights sliced once, not at every decode step
  b, p = tokens.shape
  sample = functools.partial(sample_logits, temperature=temperature, top_k=top_k, top_p=top_p)
  cache = model.init_cache(b, p + max_new_tokens, per_layer=True)  # updated in place at every step
  logits, cache = model.extend(tokens, positions, segment_ids, cache)
  key, sub = jax.random.split(key)
  first = sample(logits[:, -1], sub)
  out = jnp.zeros((b, max_new_tokens), jnp.int32).at[:, 0].set(first)
  done = first == eos_id
  ones = jnp.ones((b, 1), jnp.int32)

  def cond(carry):
    i, _, _, _, _, done = carry
    return (i < max_new_tokens) & ~jnp.all(done)

  def body(carry):
    i, last, cache, key, out, done = carry  # i tokens generated so far; `last` is token i-1 at position length+i-1
    logits, cache = model.extend(last[:, None], (lengths + i - 1)[:, None], ones, cache)
    key, sub = jax.random.split(key)
    nxt = jnp.where(done, jnp.maximum(eos_id, 0), sample(logits[:, 0], sub))
    out = jax.lax.dynamic_update_slice(out, nxt[:, None], (0, i))
    return i + 1, nxt, cache, key, out, done | (nxt == eos_id)

  steps, _, _, _, out, _ = jax.lax.while_loop(cond, body, (jnp.int32(1), first, cache, key, out, done))
  return out, steps


def _prepare(model, prompts: Sequence[Sequence[int]], max_new_tokens: int, temperature: float, top_k: int,
             top_p: float, seed: int, eos_id: int | None):
  """Validates the request and left-pads the prompts. Returns (args, kwargs) for `_generate_padded`."""
  if not prompts or any(len(p) == 0 for p in prompts):
    raise ValueError("generate needs at least one prompt and every prompt needs at least one token")
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 1")
  if temperature < 0 or top_k < 0 or not 0.0 < top_p <= 1.0:
    raise ValueError(f"bad sampling settings temperature={temperature} top_k={top_k} top_p={top_p}: need "
                     "temperature >= 0, top_k >= 0, 0 < top_p <= 1")
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
  args = (graphdef, state, tokens, positions, segment_ids, lengths, jax.random.key(seed), eos)
  kwargs = dict(max_new_tokens=int(max_new_tokens), temperature=float(temperature), top_k=int(top_k),
                top_p=float(top_p))
  return args, kwargs


def _cut(out: np.ndarray, eos_id: int | None) -> list[list[int]]:
  rows = []
  for row in np.asarray(out).tolist():
    if eos_id is not None and eos_id in row:
      row = row[:row.index(eos_id) + 1]
    rows.append(row)
  return rows


def generate(model, prompts: Sequence[Sequence[int]], *, max_new_tokens: int, temperature: float = 0.0,
             top_k: int = 0, top_p: float = 1.0, seed: int = 0, eos_id: int | None = None) -> list[list[int]]:
  """Continues each prompt (a list of token ids; lengths may differ) by up to `max_new_tokens` tokens.

  Prompts are left-padded to the longest, prefilled in one `extend` call, and decoded in one jitted `while_loop`
  (compiled once per batch size, padded prompt length, max_new_tokens and sampling settings). Returns the new tokens
  of each row as Python ints, cut after the first `eos_id` (which is included); the loop stops once every row has
  produced it. Deterministic for a given `seed`. ValueError if padded prompt length + max_new_tokens > max_len.
  """
  args, kwargs = _prepare(model, prompts, max_new_tokens, temperature, top_k, top_p, seed, eos_id)
  out, _ = _generate_padded(*args, **kwargs)
  return _cut(jax.device_get(out), eos_id)


def encode_prompt(tokenizer, text: str) -> list[int]:
  """[BOS] + ids of `text`, matching how training documents start (BOS is EOT for our own tokenizers)."""
  return [bos_id(tokenizer)] + encode(tokenizer, text)


def decode_completion(tokenizer, ids: Sequence[int]) -> str:
  """Text of generated ids, dropping a trailing EOT."""
  eot = eot_id(tokenizer)
  ids = list(ids)
  if ids and ids[-1] == eot:
    ids = ids[:-1]
  return decode(tokenizer, ids)


def generate_text(model, tokenizer, prompts: Sequence[str], *, max_new_tokens: int, temperature: float = 0.0,
                  top_k: int = 0, top_p: float = 1.0, seed: int = 0) -> list[str]:
  """Completions (new text only, EOT not included) of each prompt string; a row stops at `<|endoftext|>`."""
  ids = generate(model, [encode_prompt(tokenizer, p) for p in prompts], max_new_tokens=max_new_tokens,
                 temperature=temperature, top_k=top_k, top_p=top_p, seed=seed, eos_id=eot_id(tokenizer))
  return [decode_completion(tokenizer, row) for row in ids]


# -- command line ---------------------------------------------------------------------------------------------------


def _define_flags():
  # Defined only when run as a script so importing this module never clashes with other programs' flags.
  from absl import flags
  flags.DEFINE_string("workdir", None, "Training run directory (config, checkpoints, tokenizer.json).")
  flags.DEFINE_multi_string("prompt", None, "Prompt text; repeat for a batch. Default: config.sample.prompt.")
  flags.DEFINE_integer("max_new_tokens", None, "Tokens to generate. Default: config.sample.max_new_tokens.")
  flags.DEFINE_float("temperature", None, "0 is greedy. Default: config.sample.temperature.")
  flags.DEFINE_integer("top_k", None, "0 disables. Default: config.sample.top_k.")
  flags.DEFINE_float("top_p", None, "1 disables. Default: config.sample.top_p.")
  flags.DEFINE_integer("seed", 0, "Sampling seed.")
  flags.DEFINE_integer("step", None, "Checkpoint step to load (default: latest).")
  flags.DEFINE_enum("matmul_impl", None, ["xla", "pallas"], "Override model.matmul_impl (pallas on a QMoE workdir: "
                    "experts decoded inside the fused kernel).")
  flags.mark_flag_as_required("workdir")


def main(argv):
  from absl import flags
  from infer import loading

  if len(argv) > 1:
    sys.exit(f"error: unexpected arguments {argv[1:]}")
  f = flags.FLAGS
  try:
    config, model, tokenizer, step = loading.load_trained(f.workdir, f.step, f.matmul_impl)
  except (FileNotFoundError, ValueError) as e:
    sys.exit(f"error: cannot load --workdir={f.workdir}: {e}")
  s = config.sample
  pick = lambda value, default: default if value is None else value  # noqa: E731
  prompts = f.prompt or [s.prompt]
  settings = dict(max_new_tokens=pick(f.max_new_tokens, s.max_new_tokens), temperature=pick(f.temperature,
                  s.temperature), top_k=pick(f.top_k, s.top_k), top_p=pick(f.top_p, s.top_p), seed=f.seed)
  eos = eot_id(tokenizer)
  try:
    args, kwargs = _prepare(model, [encode_prompt(tokenizer, p) for p in prompts], eos_id=eos, **settings)
  except ValueError as e:
    sys.exit(f"error: {e}")
  rows, stats = _timed_generate(args, kwargs, eos)
  print(f"step {step} of {f.workdir}; {settings}")
  for prompt, row in zip(prompts, rows):
    print("-" * 80)
    print(prompt + decode_completion(tokenizer, row))
  print("-" * 80)
  print(f"{stats['tokens']} new tokens in {stats['seconds']:.3f} s ({stats['tokens_per_s']:.1f} tokens/s; batch "
        f"{len(rows)}, {stats['steps']} steps incl. prefill; compile {stats['compile_s']:.1f} s)")


def _timed_generate(args, kwargs, eos_id):
  """Compiles ahead of time, then times one run. Returns (rows, stats dict)."""
  t0 = time.perf_counter()
  compiled = _generate_padded.lower(*args, **kwargs).compile()
  t1 = time.perf_counter()
  out, steps = jax.block_until_ready(compiled(*args[1:]))  # graphdef (static) is not passed to `compiled`
  t2 = time.perf_counter()
  rows = _cut(jax.device_get(out), eos_id)
  n = sum(len(r) for r in rows)
  return rows, dict(tokens=n, seconds=t2 - t1, tokens_per_s=n / max(t2 - t1, 1e-9), steps=int(steps),
                    compile_s=t1 - t0)

if __name__ == "__main__":
  from absl import app
  _define_flags()
  app.run(main)
