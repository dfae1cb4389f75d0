"""The one sampler: per-request settings, their validation, and drawing the next token of every row on device.

`infer.generate` (one batch, one prefill, a jitted decode loop) and the serving engine (`infer/engine.py`) both call
`sample`; a row's key for its i-th new token is fold_in(key(seed), i), so a seeded request draws the same tokens
in either, whatever else shares its batch.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class SamplingParams:
  """Per-request decoding settings. temperature 0 is greedy; top_k 0 and top_p 1 are off; generation ends at
  max_tokens new tokens, at any of stop_tokens (included in the output) or when the text reaches one of
  stop_strings (the text is cut before it)."""

  max_tokens: int = 16
  temperature: float = 0.0
  top_k: int = 0
  top_p: float = 1.0
  seed: int = 0
  stop_tokens: tuple[int, ...] = ()
  stop_strings: tuple[str, ...] = ()
  adapter: int = 0  # the LoRA adapter of the serving engine's bank that decodes the request (0: the base model)
  logprobs: int = -1  # server responses: -1 none; k >= 0: each token's log-probability and its top k alternatives

  def validate(self) -> "SamplingParams":
    """self, or ValueError naming the first bad setting and what is allowed."""
    if self.max_tokens < 1:
      raise ValueError(f"max_tokens={self.max_tokens} must be >= 1")
    if self.temperature < 0:
      raise ValueError(f"temperature={self.temperature} must be >= 0")
    if self.top_k < 0:
      raise ValueError(f"top_k={self.top_k} must be >= 0 (0 disables)")
    if not 0.0 < self.top_p <= 1.0:
      raise ValueError(f"top_p={self.top_p} must be in (0, 1]")
    if not 0 <= self.seed < 2**31:
      raise ValueError(f"seed={self.seed} must be in [0, 2**31)")
    return self


def row_settings(params) -> dict[str, np.ndarray]:
  """The per-row arrays `sample` takes, from one SamplingParams per row: seeds, top_k [B] int32; temperature,
  top_p [B] float32."""
  return {"seeds": np.array([p.seed for p in params], np.int32),
          "temperature": np.array([p.temperature for p in params], np.float32),
          "top_k": np.array([p.top_k for p in params], np.int32),
          "top_p": np.array([p.top_p for p in params], np.float32)}


def filtered_logits(logits: jax.Array, temperature: jax.Array, top_k: jax.Array, top_p: jax.Array) -> jax.Array:
  """The distribution `sample` draws from, as logits: [B, V] float -> [B, V] float32, the logits divided by the
  temperature with every token outside the top_k largest (0 = off) and outside the nucleus of what is left (the
  smallest set of most likely tokens whose probability reaches top_p; 1 = off; the top token is always kept; ties at
  the cut-off are kept) set to -inf. temperature, top_p [B] float32 (> 0 here), top_k [B] int32."""
  vocab = logits.shape[-1]
  scaled = logits.astype(jnp.float32) / jnp.maximum(temperature, 1e-6)[:, None]
  ordered = -jnp.sort(-scaled, axis=-1)  # descending
  rank = jnp.arange(vocab, dtype=jnp.int32)[None, :]
  in_top_k = (top_k[:, None] == 0) | (rank < top_k[:, None])
  ordered = jnp.where(in_top_k, ordered, -jnp.inf)
  probs = jax.nn.softmax(ordered, axis=-1)
  mass_before = jnp.cumsum(probs, axis=-1) - probs
  # at least the top token: a top_p that rounds to 0 in float32 means greedy, not "no filtering"
  keep = jnp.maximum(jnp.sum((mass_before < top_p[:, None]) & in_top_k, axis=-1, keepdims=True), 1)
  threshold = jnp.take_along_axis(ordered, keep - 1, axis=-1)  # smallest kept logit
  return jnp.where(scaled < threshold, -jnp.inf, scaled)


def row_keys(seeds: jax.Array, counters: jax.Array) -> jax.Array:
  """Row b's key for its counters[b]-th new token: fold_in(key(seeds[b]), counters[b]). [B] int32 each -> [B] keys."""
  return jax.vmap(lambda s, c: jax.random.fold_in(jax.random.key(s), c))(seeds, counters)


def sample(logits: jax.Array, seeds: jax.Array, counters: jax.Array, temperature: jax.Array, top_k: jax.Array,
           top_p: jax.Array) -> jax.Array:
  """One token per row with per-row settings. logits [B, V] float; seeds, counters, top_k [B] int32; temperature,
  top_p [B] float32. Returns [B] int32.

  temperature 0 is greedy (argmax). Otherwise a draw from `filtered_logits` with row b's key
  fold_in(key(seeds[b]), counters[b]) (`row_keys`). When no row samples, only the argmax runs."""
  logits = logits.astype(jnp.float32)
  greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)

  def sampled(_):
    masked = filtered_logits(logits, temperature, top_k, top_p)
    drawn = jax.vmap(jax.random.categorical)(row_keys(seeds, counters), masked).astype(jnp.int32)
    return jnp.where(temperature > 0, drawn, greedy)

  return jax.lax.cond(jnp.any(temperature > 0), sampled, lambda _: greedy, None)
