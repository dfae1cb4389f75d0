"""Speculative decoding by prompt lookup: drafts copied from the context, verified by the model in one pass.

Each round proposes `k` draft tokens per row by n-gram matching (the most recent earlier occurrence of the row's
last n tokens, n = `ngram` down to 1, and the k tokens that followed it: no draft model), feeds the last emitted
token and the k drafts to the model in one `extend` call, and keeps the drafts the model agrees with plus one token
of its own. The KV cache is rolled back by moving its index: the rejected slots lie past every later query's causal
window until they are overwritten.

Acceptance is the standard speculative-sampling rule with a one-hot draft distribution: draft d is kept with
probability p(d), where p is the distribution `sampling.sample` draws from (`sampling.filtered_logits`), and on
rejection the row's token is drawn from p with d removed, so every emitted token is distributed exactly as ordinary
decoding's. Greedy rows keep d when it is the argmax, so their output is identical to ordinary greedy decoding.
Rows of a batch share the cache index, so a round advances every row by the fewest tokens any live row accepted;
the tokens a row loses that way are recomputed in the next round (with the same keys, so the same decisions).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from infer import sampling

# fold_in tags (after a token's counter) of its acceptance draw, its residual draw and a draft model's draw
DRAFT_KEY, RESIDUAL_KEY, DRAFT_SAMPLE_KEY = 1, 2, 3


SPECULATE = ("none", "lookup", "draft")  # ordinary decoding; prompt lookup; a draft model


def check_settings(speculate: str, draft_tokens: int, ngram: int, draft_model=None, model=None) -> None:
  """ValueError naming the bad setting unless the speculation settings can run (`infer.generate`, the engine)."""
  if speculate not in SPECULATE:
    raise ValueError(f"speculate={speculate!r} must be one of {list(SPECULATE)}")
  if speculate == "none":
    return
  if not 1 <= draft_tokens <= 16:
    raise ValueError(f"draft_tokens={draft_tokens} must be in [1, 16] (tokens verified per model call - 1)")
  if not 1 <= ngram <= 8:
    raise ValueError(f"ngram={ngram} must be in [1, 8] (the longest context suffix looked up)")
  if speculate == "lookup":
    return
  if draft_model is None:
    raise ValueError("speculate='draft' needs a draft model (--draft_workdir: a run with the same tokenizer)")
  if model is not None and draft_model.spec.vocab_size != model.spec.vocab_size:
    raise ValueError(f"the draft model's vocabulary ({draft_model.spec.vocab_size} tokens) differs from the model's "
                     f"({model.spec.vocab_size}): a draft must share the tokenizer")
  if model is not None and draft_model.spec.max_len < model.spec.max_len:
    raise ValueError(f"the draft model's max_len={draft_model.spec.max_len} is shorter than the model's "
                     f"{model.spec.max_len}")


def lookup_drafts(history: jax.Array, end: jax.Array, k: int, ngram: int) -> jax.Array:
  """Draft tokens from the context. history [B, T] int32, end [] int32: history[:, end] is each row's newest token.
  Returns [B, k] int32: the k tokens after the most recent earlier occurrence of the row's last n tokens, for the
  largest n <= `ngram` that occurs (n = 1 matches the newest token alone); without any match, the newest token
  repeated. Positions past `end` read as they are (not yet generated: zeros), which only weakens a draft."""
  b, t = history.shape
  pos = jnp.arange(t, dtype=jnp.int32)
  newest = jax.lax.dynamic_slice_in_dim(history, end - ngram + 1, ngram, axis=1)  # [B, ngram], oldest first
  best = jnp.full((b,), -1, jnp.int32)
  matched = jnp.zeros((b,), jnp.bool_)
  for n in range(ngram, 0, -1):  # the longest n-gram that occurs wins
    same = jnp.ones((b, t), jnp.bool_)
    for j in range(n):  # history[e - j] == the j-th newest token
      shifted = jnp.roll(history, j, axis=1)
      same &= (shifted == newest[:, ngram - 1 - j][:, None]) & (pos >= j)[None]
    same &= (pos < end)[None] & (pos >= n - 1)[None]  # earlier occurrences only
    last = jnp.max(jnp.where(same, pos[None], -1), axis=1)  # the most recent one
    best = jnp.where(~matched & (last >= 0), last, best)
    matched |= last >= 0
  take = jnp.clip(best[:, None] + 1 + jnp.arange(k, dtype=jnp.int32)[None], 0, t - 1)
  newest_token = newest[:, -1:]
  return jnp.where(matched[:, None], jnp.take_along_axis(history, take, axis=1), newest_token)


def lookup_drafts_rows(history: jax.Array, ends: jax.Array, k: int, ngram: int) -> jax.Array:
  """`lookup_drafts` with each row's own newest position: history [B, T] int32, ends [B] int32 -> [B, k] int32."""
  return jax.vmap(lambda row, end: lookup_drafts(row[None], end, k, ngram)[0])(history, ends)


def verify(logits: jax.Array, drafts: jax.Array, settings: dict, counters: jax.Array,
           draft_probs: jax.Array | None = None, limit: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """The acceptance rule over one round. logits [B, k + 1, V] float32: the model's next-token logits after the last
  emitted token and after each draft; drafts [B, k] int32; settings: `sampling.row_settings` arrays [B]; counters [B]
  int32: the index of the round's first new token in each row's output (token j draws with counter + j);
  draft_probs [B, k, V] float32: the distribution each draft was drawn from (None: one-hot, as prompt lookup's).
  Draft j is kept with probability min(1, p(d) / q(d)); a rejected one is replaced by a draw from max(p - q, 0)
  renormalized, which with a one-hot q is p without d. limit [B] int32 (default k): the drafts a row may keep (the
  rest are ignored: its own token at `limit` is drawn from p).

  Returns (accepted [B] int32 in 0..k: leading drafts kept, tokens [B, k + 1] int32: token j is draft j where
  j < accepted and the row's own token at j = accepted; entries after it are unspecified)."""
  b, k1, vocab = logits.shape
  k = k1 - 1
  temperature = settings["temperature"]
  rep = lambda x: jnp.repeat(x, k1, axis=0)  # noqa: E731  [B] -> [B * (k + 1)]: one row per position
  flat = logits.reshape(b * k1, vocab)
  greedy = jnp.argmax(flat, axis=-1).astype(jnp.int32).reshape(b, k1)
  draft_at = jnp.concatenate([drafts, jnp.zeros((b, 1), jnp.int32)], axis=1)  # position k has no draft
  limit = jnp.full((b,), k, jnp.int32) if limit is None else limit
  has_draft = (jnp.arange(k1)[None] < limit[:, None]).reshape(-1)  # positions without a draft draw from p itself

  def sampled(_):
    masked = sampling.filtered_logits(flat, rep(temperature), rep(settings["top_k"]), rep(settings["top_p"]))
    keys = sampling.row_keys(rep(settings["seeds"]), (counters[:, None] + jnp.arange(k1)[None]).reshape(-1))
    probs = jax.nn.softmax(masked, axis=-1)
    p_draft = jnp.take_along_axis(probs, draft_at.reshape(-1, 1), axis=1)[:, 0]
    u = jax.vmap(lambda key: jax.random.uniform(jax.random.fold_in(key, DRAFT_KEY)))(keys)
    if draft_probs is None:
      keep = u < p_draft
      rest = jnp.where(jnp.arange(vocab)[None] == draft_at.reshape(-1, 1), -jnp.inf, masked)  # p without d
    else:
      q = jnp.concatenate([draft_probs, jnp.zeros((b, 1, vocab), draft_probs.dtype)], axis=1).reshape(b * k1, vocab)
      q_draft = jnp.take_along_axis(q, draft_at.reshape(-1, 1), axis=1)[:, 0]
      keep = u * q_draft < p_draft  # u < p / q without dividing by a zero q
      excess = jnp.maximum(probs - q, 0.0)
      # p == q leaves nothing to draw from, but then a draft is never rejected: fall back to p to stay finite
      rest = jnp.where(jnp.sum(excess, -1, keepdims=True) > 0, jnp.log(excess), masked)
    residual = jnp.where(has_draft[:, None], rest, masked)
    drawn = jax.vmap(lambda key, row: jax.random.categorical(jax.random.fold_in(key, RESIDUAL_KEY), row))(keys, residual)
    return keep.reshape(b, k1), drawn.astype(jnp.int32).reshape(b, k1)

  greedy_keep = draft_at == greedy
  keep, own = jax.lax.cond(jnp.any(temperature > 0), sampled, lambda _: (greedy_keep, greedy), None)
  is_greedy = (temperature <= 0)[:, None]
  keep = jnp.where(is_greedy, greedy_keep, keep) & has_draft.reshape(b, k1)
  keep = keep[:, :k]
  own = jnp.where(is_greedy, greedy, own)
  accepted = jnp.sum(jnp.cumprod(keep.astype(jnp.int32), axis=1), axis=1)
  j = jnp.arange(k1)[None]
  return accepted, jnp.where(j < accepted[:, None], draft_at, own)


def draft_pick(logits: jax.Array, settings: dict, counters: jax.Array) -> tuple[jax.Array, jax.Array]:
  """A draft model's token and the distribution it came from: logits [B, V] float32, counters [B] int32 (the output
  index of the token drafted) -> (token [B] int32, q [B, V] float32; zeros when no row samples: greedy drafts)."""
  greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
  temperature = settings["temperature"]

  def sampled(_):
    masked = sampling.filtered_logits(logits, temperature, settings["top_k"], settings["top_p"])
    keys = sampling.row_keys(settings["seeds"], counters)
    drawn = jax.vmap(lambda key, row: jax.random.categorical(jax.random.fold_in(key, DRAFT_SAMPLE_KEY), row))(
        keys, masked).astype(jnp.int32)
    return jnp.where(temperature > 0, drawn, greedy), jax.nn.softmax(masked, axis=-1)

  return jax.lax.cond(jnp.any(temperature > 0), sampled, lambda _: (greedy, jnp.zeros_like(logits)), None)


def paged_drafts(draft, pages: list, history: jax.Array, last_pos: jax.Array, budget: jax.Array,
                 page_table: jax.Array, settings: dict, counters: jax.Array, k: int):
  """k drafts per row from a draft model over its own paged KV pool (the engine's page table). history [B, T] int32
  (prompt + output, zeros after), last_pos [B] int32: the newest token's position (-1: an idle row), budget [B]: drafts
  the row may use, counters [B]: the output index of its first draft. As `_draft_round`, one 2-token call re-feeds the
  token before the newest one (whatever the previous round kept, the draft's pages then match the output) and k - 1
  one-token calls follow. Returns (drafts [B, k] int32, q [B, k, V] float32, pages)."""
  active = last_pos >= 0
  at = jnp.maximum(last_pos - 1, 0)[:, None] + jnp.arange(2)[None]  # [B, 2]
  two = jnp.take_along_axis(history, at, axis=1)
  live = jnp.broadcast_to(active[:, None], two.shape).astype(jnp.int32)
  logits, pages = draft.extend_paged(two, live, at * live, page_table, jnp.where(active, last_pos + 1, 0), pages)
  first, q_first = draft_pick(logits[:, -1].astype(jnp.float32), settings, counters)
  max_position = draft.spec.max_len - 1

  def step(carry, j):
    token, pages = carry
    write = (active & (j + 1 < budget)).astype(jnp.int32)[:, None]  # drafts past the budget are never verified
    position = jnp.minimum(last_pos + 1 + j, max_position)[:, None] * write
    logits, pages = draft.extend_paged(token[:, None], write, position, page_table,
                                       jnp.where(active, position[:, 0] + 1, 0), pages)
    nxt, q = draft_pick(logits[:, 0].astype(jnp.float32), settings, counters + j + 1)
    return (nxt, pages), (nxt, q)

  (_, pages), (rest, q_rest) = jax.lax.scan(step, (first, pages), jnp.arange(k - 1, dtype=jnp.int32))
  drafts = jnp.concatenate([first[:, None], rest.T], axis=1)
  q = jnp.concatenate([q_first[:, None], q_rest.transpose(1, 0, 2)], axis=1)
  return drafts, q, pages


def _draft_round(draft, cache, history, lengths, i, p: int, k: int, settings):
  """k draft tokens from a draft model. Its cache is rolled back to hold everything before token i-2 of the output
  (slot p + i - 2), so one 2-token call re-feeds that token and feeds the newest one: whatever the previous round kept,
  the cache then matches the output. Returns (drafts [B, k] int32, their distributions q [B, k, V] float32 (zeros
  when no row samples), the draft cache)."""
  b = history.shape[0]
  pick = lambda logits, j: draft_pick(logits, settings, jnp.full((b,), i + j, jnp.int32))  # noqa: E731
  cache = dict(cache, index=p + i - 2)
  two = jax.lax.dynamic_slice_in_dim(history, p + i - 2, 2, axis=1)
  logits, cache = draft.extend(two, (lengths + i - 2)[:, None] + jnp.arange(2)[None], jnp.ones_like(two), cache)
  first, q_first = pick(logits[:, -1].astype(jnp.float32), 0)

  def step(carry, j):
    token, cache = carry
    logits, cache = draft.extend(token[:, None], (lengths + i + j)[:, None], jnp.ones((b, 1), jnp.int32), cache)
    nxt, q = pick(logits[:, 0].astype(jnp.float32), j + 1)
    return (nxt, cache), (nxt, q)

  (_, cache), (rest, q_rest) = jax.lax.scan(step, (first, cache), jnp.arange(k - 1, dtype=jnp.int32))
  drafts = jnp.concatenate([first[:, None], rest.T], axis=1)
  q = jnp.concatenate([q_first[:, None], q_rest.transpose(1, 0, 2)], axis=1)
  return drafts, q, cache


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "draft_tokens", "ngram", "draft_graphdef"))
def generate_speculative(graphdef, state, tokens, positions, segment_ids, lengths, settings, eos_id, draft_state=None,
                         *, max_new_tokens: int, draft_tokens: int, ngram: int = 3, draft_graphdef=None):
  """`generate._generate_padded` with speculation (same arguments and outputs; the prompts are left-padded tokens
  [B, P]): drafts from prompt lookup (n-grams of up to `ngram` tokens), or from a draft model (`draft_graphdef` /
  `draft_state`, same vocabulary) that decodes `draft_tokens` tokens ahead with the same sampling settings and its
  own KV cache. Returns (new tokens [B, max_new_tokens] int32, target-model calls including the prefill [] int32,
  drafts kept [] int32 summed over rows and rounds)."""
  model = nnx.merge(graphdef, state).unstacked()
  draft = None if draft_graphdef is None else nnx.merge(draft_graphdef, draft_state).unstacked()
  b, p = tokens.shape
  k = draft_tokens
  width = max_new_tokens + k + 1  # a round writes k + 1 tokens from i, which may run past the end (cut at return)
  cache = model.init_cache(b, p + width, per_layer=True)
  logits, cache = model.extend(tokens, positions, segment_ids, cache)
  draft_cache = None
  if draft is not None:
    draft_cache = draft.extend(tokens, positions, segment_ids, draft.init_cache(b, p + width, per_layer=True))[1]
  first = sampling.sample(logits[:, -1], counters=jnp.zeros((b,), jnp.int32), **settings)
  history = jnp.concatenate([tokens, jnp.zeros((b, width), jnp.int32)], axis=1).at[:, p].set(first)
  done = first == eos_id
  max_position = model.spec.max_len - 1

  def cond(carry):
    i, _, _, _, done, _, _ = carry
    return (i < max_new_tokens) & ~jnp.all(done)

  def body(carry):
    i, history, cache, draft_cache, done, calls, kept = carry  # i tokens out; token i-1 is history[:, p + i - 1]
    last = jax.lax.dynamic_slice_in_dim(history, p + i - 1, 1, axis=1)  # [B, 1]
    if draft is None:
      drafts, q = lookup_drafts(history, p + i - 1, k, ngram), None
    else:
      drafts, q, draft_cache = _draft_round(draft, draft_cache, history, lengths, i, p, k, settings)
    feed = jnp.concatenate([last, drafts], axis=1)
    pos = jnp.minimum((lengths + i - 1)[:, None] + jnp.arange(k + 1)[None], max_position)  # past max_len: cut anyway
    index = cache["index"]
    logits, cache = model.extend(feed, pos, jnp.ones_like(feed), cache)
    accepted, new = verify(logits, drafts, settings, jnp.full((b,), i, jnp.int32), q)
    advance = jnp.min(jnp.where(done, k, accepted)) + 1  # every row keeps this many tokens (done rows: any)
    j = jnp.arange(k + 1)[None]
    is_eos = (new == eos_id) & (j < advance)
    after_eos = jnp.cumsum(is_eos.astype(jnp.int32), axis=1) - is_eos.astype(jnp.int32) > 0
    new = jnp.where(done[:, None] | after_eos, jnp.maximum(eos_id, 0), new)
    history = jax.lax.dynamic_update_slice(history, new, (0, p + i))
    cache = dict(cache, index=index + advance)  # the rejected slots are overwritten by the next round
    live = jnp.sum(~done)
    return (i + advance, history, cache, draft_cache, done | jnp.any(is_eos, axis=1), calls + 1,
            kept + live * (advance - 1))

  init = (jnp.int32(1), history, cache, draft_cache, done, jnp.int32(1), jnp.int32(0))
  _, history, _, _, _, calls, kept = jax.lax.while_loop(cond, body, init)
  return history[:, p:p + max_new_tokens], calls, kept
