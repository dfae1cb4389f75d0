"""Serving engine: a fixed set of decode slots over a paged KV cache, with jitted static-shape steps.

The JetStream-style cycle, driven by `infer/scheduler.py`:
  * `insert(prompt, params)` takes a free slot and pages: with `page_allocation="reserve"` every page the request can
    ever need (ceil((prompt + max_tokens) / page_size)); with "on_demand" only those its prompt fills, and each decode
    step takes a page when a sequence crosses into a new one. When the pool runs out, the newest request is
    preempted: its pages are freed, it is listed in `preempted`, and the scheduler inserts it again later with
    `resume=` its output so far, which is prefilled after its prompt (recomputed), so its output is unchanged.
    `insert` returns None when no slot or not enough free pages are left.
  * `prefill(slot)` runs the next chunk of the slot's prompt (at most `prefill_chunk` tokens, padded to a power-of-two
    bucket so that only a few shapes compile) and writes its keys and values into the slot's pages. After the last
    chunk it samples the first new token and the slot starts decoding; earlier chunks return None. Chunking keeps a
    long prompt from stalling the running decodes for a whole prefill.
  * `generate()` runs one decode step for every decoding slot at once (one jitted call over all slots; idle slots
    write to the scratch page 0 and are ignored) and returns {slot: [token]}. Steps read only as many page-table
    columns as the longest sequence needs, rounded up to a power of two. With speculation (`speculate="lookup"` or
    "draft", `infer/speculative.py`) the step verifies k drafts per request in one call and returns the 1 to k + 1
    tokens each request keeps; drafts never run past the pages reserved at insert (a request's budget is its tokens
    left - 1), and rejected drafts leave keys and values past the request's length that its next step overwrites.
  * `step()` (`mixed_batches=True`) does both in one call: the prefilling slots' next chunks (oldest first, at most
    `prefill_chunk` prompt tokens in all, so several short prompts prefill together) ride beside one decode token of
    every decoding slot. Each layer's projections and MLP run over all of the step's tokens in one pass over the
    weights; only attention works per group (`attention.PagedGroups`). A step then costs one decode plus one
    bounded prefill, whatever number of requests just arrived. Speculative rounds and adapter banks keep the
    separate calls.
  * `release(slot)` returns the slot's pages to the free list (on completion or cancellation).

Prefix caching (`prefix_caching=True`): every page a prompt fills completely is registered under a hash of all the
prompt tokens up to its end (and the request's LoRA adapter), so a later request whose prompt starts with the same
pages maps them into its page table instead of computing them again (its prefill starts after them; at least its
last prompt token is always computed, for its first token's logits). Shared pages are only ever read: a request
writes from its first uncached position on. A page keeps a reference count; when it drops to zero the page stays
cached but evictable, and pages are taken least recently used first when the free list runs out.
`prefix_hit_rate` is the share of admitted prompt tokens served from the cache.

Pages are `page_size` slots of every layer's keys and values: k/v [layers, num_pages, page_size, kv_heads,
head_dim]. Page 0 is scratch and never handed out. Attention reads pages through the slot's page table: the Pallas
paged decode kernel (`model.attention_impl=pallas`); with `xla`, decode rows on a CPU run the native kernel that reads
live pages in place (`model.matmul_impl` auto or native; `cpu_native.paged_decode_attention`) and everything else a
gather plus the jnp reference.

A model with a LoRA adapter bank (`loading.with_adapter_bank`) decodes each row with the adapter its request names
(`SamplingParams.adapter`; 0 is the base model), so requests for different fine-tunes share one batch.

Sampling runs on device with per-request settings (temperature, top-k, top-p, seed); a request's key for its i-th
new token is fold_in(key(seed), i), so a seeded request samples the same tokens whatever else is running.
Greedy decoding (temperature 0) gives the same tokens as `infer.generate.generate` on the prompt alone.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import hashlib
import itertools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from infer import sampling
from infer import speculative
from model import lora
from infer.sampling import SamplingParams


PAGE_ALLOCATIONS = ("reserve", "on_demand")  # pages for prompt + max_tokens at admission, or as sequences grow
# Prompt tokens a mixed step prefills when prefill_chunk is not given: under bursty arrivals on a 2-core CPU it kept
# inter-token latency p99 at 0.47x and throughput at 1.09x of whole-prompt prefill calls (docs/bench_serve_mixed.json)
MIXED_STEP_TOKENS = 64
TOP_LOGPROBS = 5  # alternatives reported per generated token (OpenAI's completions allow up to 5)
Logprob = tuple[float, tuple[tuple[int, float], ...]]  # (the token's log-probability, the top alternatives)


@functools.partial(jax.jit, static_argnames=("graphdef",), donate_argnames=("pages",))
def _step(graphdef, state, pages, tokens, live, positions, page_table, lengths, last_index, counters, settings,
          adapters):
  """One paged extend + sampling at each row's `last_index`. tokens/live/positions [B, L]; adapters [B] int32 (the
  LoRA adapter of each row, for models with an adapter bank); returns ([B], pages)."""
  model = nnx.merge(graphdef, state)
  with lora.row_adapters(adapters):
    logits, pages = model.extend_paged(tokens, live, positions, page_table, lengths, pages)
  last = jnp.take_along_axis(logits, last_index[:, None, None], axis=1)[:, 0]
  return _sample(last, counters, settings), pages


@functools.partial(jax.jit, static_argnames=("graphdef",), donate_argnames=("pages",))
def _mixed_step(graphdef, state, pages, groups, counters, settings):
  """One model call over several row groups (prefill chunks [P, Lp] beside decode tokens [S, 1]: `mixed_batches`):
  groups as `Transformer.extend_paged_groups` takes them; counters and settings per row, group after group. Returns
  (`_sample`'s tuple over all rows, pages)."""
  last, pages = nnx.merge(graphdef, state).extend_paged_groups(groups, pages)
  return _sample(last, counters, settings), pages


def _sample(last, counters, settings):
  """Samples each row's next token from its logits last [R, vocab]: (tokens [R], their log-probabilities [R], the
  top log-probabilities [R, TOP_LOGPROBS] and their ids)."""
  chosen = sampling.sample(last, counters=counters, **settings)
  # log-probabilities of the model's distribution (before temperature and filtering), as OpenAI's logprobs report
  logp = jax.nn.log_softmax(last.astype(jnp.float32), axis=-1)
  top_lp, top_ids = jax.lax.top_k(logp, TOP_LOGPROBS)
  return chosen, jnp.take_along_axis(logp, chosen[:, None], axis=1)[:, 0], top_lp, top_ids


@functools.partial(jax.jit, static_argnames=("graphdef", "draft_graphdef", "k", "ngram"),
                   donate_argnames=("pages", "draft_pages"))
def _speculative_step(graphdef, state, pages, draft_graphdef, draft_state, draft_pages, history, last_pos, budget,
                      page_table, counters, settings, adapters, *, k: int, ngram: int):
  """One speculative round for every decoding row: k drafts (prompt lookup, or the draft model over its own pages
  when `draft_graphdef` is given), verified by one paged extend over [newest token, drafts].

  history [B, T] int32: each row's prompt + output (zeros after); last_pos [B] int32: its newest token's position (-1:
  the row does not decode now); budget [B] int32 in 0..k: drafts it may keep (its tokens left - 1); page_table [B, M];
  counters [B]: the output index of its first new token. Returns ((accepted [B], tokens [B, k + 1], their logprobs
  [B, k + 1], top logprobs [B, k + 1, TOP_LOGPROBS] and ids), pages, draft_pages): row b emits tokens[b, :accepted + 1].
  Rejected drafts leave keys and values past the row's length, overwritten by its next round."""
  model = nnx.merge(graphdef, state)
  active = last_pos >= 0
  if draft_graphdef is None:
    drafts, q = speculative.lookup_drafts_rows(history, jnp.maximum(last_pos, 0), k, ngram), None
  else:
    draft = nnx.merge(draft_graphdef, draft_state)
    drafts, q, draft_pages = speculative.paged_drafts(draft, draft_pages, history, last_pos, budget, page_table,
                                                      settings, counters, k)
  newest = jnp.take_along_axis(history, jnp.maximum(last_pos, 0)[:, None], axis=1)
  feed = jnp.concatenate([newest, drafts], axis=1)  # [B, k + 1]
  j = jnp.arange(k + 1)[None]
  live = (active[:, None] & (j <= budget[:, None])).astype(jnp.int32)
  positions = (last_pos[:, None] + j) * live
  with lora.row_adapters(adapters):
    logits, pages = model.extend_paged(feed, live, positions, page_table, jnp.where(active, last_pos + 1 + budget, 0),
                                       pages)
  logits = logits.astype(jnp.float32)
  accepted, tokens = speculative.verify(logits, drafts, settings, counters, q, limit=budget)
  logp = jax.nn.log_softmax(logits, axis=-1)
  top_lp, top_ids = jax.lax.top_k(logp, TOP_LOGPROBS)
  chosen_lp = jnp.take_along_axis(logp, tokens[..., None], axis=2)[..., 0]
  return (accepted, tokens, chosen_lp, top_lp, top_ids), pages, draft_pages


@functools.partial(jax.jit, static_argnames=("graphdef",), donate_argnames=("pages",))
def _draft_prefill(graphdef, state, pages, tokens, live, positions, page_table, lengths):
  """Writes a prefill chunk into the draft model's pages (speculate="draft"): the arguments of `_step`."""
  return nnx.merge(graphdef, state).extend_paged(tokens, live, positions, page_table, lengths, pages)[1]


@dataclasses.dataclass
class _Slot:
  prompt: list[int]
  params: SamplingParams
  pages: list[int]
  prefilled: int = 0  # context tokens already written (the prompt, then a resumed request's earlier output)
  output: list[int] = dataclasses.field(default_factory=list)  # new tokens sampled so far
  order: int = 0  # admission order: preemption takes the newest request first
  context: int = 0  # tokens the prefill writes: the prompt plus, for a resumed request, its earlier output

  @property
  def generated(self) -> int:
    return len(self.output)

  @property
  def last_token(self) -> int:
    return self.output[-1]


class Engine:
  """Continuous-batching engine over a paged KV cache (see the module docstring).

  model: a `Transformer` (float or int8 weights). slots: concurrent sequences. page_size: slots per page (a power
  of two >= 16). num_pages: pages in the pool including the scratch page (default: enough for every slot at the
  model's max_len). prefill_chunk: the most prompt tokens per prefill call (default max_len: no chunking).
  speculate: "none", "lookup" (drafts copied from n-grams of up to `ngram` tokens of the request's context) or
  "draft" (drafts from `draft_model`, same tokenizer, over its own page pool): each decode step verifies
  `draft_tokens` drafts per request in one model call and emits 1 to draft_tokens + 1 tokens per request.
  page_allocation: "reserve" or "on_demand". mixed_batches: prefill chunks and decode tokens in one call per
  iteration (`step`; then prefill_chunk is the step's prompt-token budget, shared by the prefilling requests, by
  default MIXED_STEP_TOKENS).
  """

  def __init__(self, model, *, slots: int = 8, page_size: int = 16, num_pages: int | None = None,
               prefill_chunk: int | None = None, prefix_caching: bool = False, speculate: str = "none",
               draft_tokens: int = 4, ngram: int = 3, draft_model=None, page_allocation: str = "reserve",
               mixed_batches: bool = False):
    speculative.check_settings(speculate, draft_tokens, ngram, draft_model, model)
    if page_allocation not in PAGE_ALLOCATIONS:
      raise ValueError(f"page_allocation={page_allocation!r} must be one of {list(PAGE_ALLOCATIONS)}")
    self.page_allocation = page_allocation
    self.model = model
    self.speculate, self.draft_tokens, self.ngram = speculate, draft_tokens, ngram
    self.draft_model = draft_model if speculate == "draft" else None
    self.prefix_caching = prefix_caching
    self.max_len = model.spec.max_len
    if slots < 1:
      raise ValueError(f"slots={slots} must be >= 1")
    if page_size < 16 or page_size & (page_size - 1):
      raise ValueError(f"page_size={page_size} must be a power of two >= 16")
    self.slots, self.page_size = slots, page_size
    self.max_pages = math.ceil(self.max_len / page_size)
    self.num_pages = num_pages or slots * self.max_pages + 1
    if self.num_pages < 2:
      raise ValueError(f"num_pages={self.num_pages} must be >= 2 (page 0 is scratch)")
    # one call per iteration (`step`); speculative rounds and adapter banks keep their own calls (`prefill`, `generate`)
    self.mixed_batches = bool(mixed_batches) and speculate == "none" and not model.spec.lora_bank
    self.prefill_chunk = prefill_chunk or (min(MIXED_STEP_TOKENS, self.max_len) if self.mixed_batches else self.max_len)
    if not 1 <= self.prefill_chunk <= self.max_len:
      raise ValueError(f"prefill_chunk={self.prefill_chunk} must be in [1, max_len={self.max_len}]")
    # mixed steps lay prompt chunks out in rows of prefill_row tokens, at most prefill_rows of them per step
    self.prefill_row = min(32, max(16, 1 << (self.prefill_chunk - 1).bit_length()))
    self.prefill_rows = -(-self.prefill_chunk // self.prefill_row)
    self._graphdef, self._state = nnx.split(model.unstacked())
    self._draft_graphdef = self._draft_state = None
    if self.draft_model is not None:
      self._draft_graphdef, self._draft_state = nnx.split(self.draft_model.unstacked())
    self.reset()

  def reset(self) -> None:
    """Empties every slot and makes fresh KV pages (after a failed step, whose donated pages may be gone)."""
    # Committed to the device like the step's (donated) outputs, so the second call does not compile again.
    self._pages = jax.device_put(self.model.init_pages(self.num_pages, self.page_size), jax.devices()[0])
    self._draft_pages = None
    if self.draft_model is not None:
      self._draft_pages = jax.device_put(self.draft_model.init_pages(self.num_pages, self.page_size), jax.devices()[0])
    self._free_pages = list(range(self.num_pages - 1, 0, -1))  # a stack; page 0 is scratch
    self._table = np.zeros((self.slots, self.max_pages), np.int32)
    self._active: dict[int, _Slot] = {}
    self._page_hash: dict[int, bytes] = {}  # cached page -> the hash of the prompt tokens up to its end
    self._cached: dict[bytes, int] = {}  # that hash -> its page
    self._refs: dict[int, int] = {}  # cached page -> requests using it
    self._evictable: collections.OrderedDict[int, None] = collections.OrderedDict()  # cached, unused; oldest first
    self.prompt_tokens = self.prefix_hit_tokens = 0  # admitted prompt tokens, and those read from cached pages
    self._row_logprobs: list[Logprob] = []
    self.logprobs: dict[int, list[Logprob]] = {}  # slot -> its last step's tokens' log-probabilities and top ones
    self.speculative_rounds = self.drafts_proposed = self.drafts_accepted = 0  # over decoding rows
    self.preemptions = 0
    self.preempted: list[int] = []  # slots the last `generate` preempted (their requests go back to the queue)
    self._admitted = 0

  @property
  def acceptance_rate(self) -> float:
    """Share of verified drafts the model kept (speculation only)."""
    return self.drafts_accepted / self.drafts_proposed if self.drafts_proposed else 0.0

  # -- capacity ---------------------------------------------------------------------------------------------------

  @property
  def free_pages(self) -> int:
    """Pages a new request can take: the free list plus cached pages no request uses."""
    return len(self._free_pages) + len(self._evictable)

  @property
  def cached_pages(self) -> int:
    return len(self._page_hash)

  @property
  def prefix_hit_rate(self) -> float:
    return self.prefix_hit_tokens / self.prompt_tokens if self.prompt_tokens else 0.0

  @property
  def active_slots(self) -> int:
    return len(self._active)

  @property
  def used_pages(self) -> int:
    """Pages held by running requests (the pool's occupancy; cached pages nobody uses count as free)."""
    return self.num_pages - 1 - self.free_pages

  def pages_needed(self, prompt_len: int, max_tokens: int) -> int:
    return math.ceil((prompt_len + max_tokens) / self.page_size)

  def admission_pages(self, prompt_len: int, max_tokens: int, resumed: int = 0) -> int:
    """Pages a request takes when admitted: every page it could need (reserve), or those its prefill writes
    (on_demand: the prompt and a resumed request's earlier output; decode steps take the rest as they go)."""
    if self.page_allocation == "reserve":
      return self.pages_needed(prompt_len, max_tokens)
    return math.ceil((prompt_len + resumed) / self.page_size)

  def check_fits(self, prompt: Sequence[int], params: SamplingParams) -> None:
    """ValueError unless the request could ever run here (context length and pool size)."""
    if not prompt:
      raise ValueError("the prompt must have at least one token")
    if len(prompt) + params.max_tokens > self.max_len:
      raise ValueError(f"prompt ({len(prompt)} tokens) + max_tokens ({params.max_tokens}) = "
                       f"{len(prompt) + params.max_tokens} exceeds the model's context of {self.max_len} tokens")
    if self.pages_needed(len(prompt), params.max_tokens) > self.num_pages - 1:
      raise ValueError(f"the request needs {self.pages_needed(len(prompt), params.max_tokens)} pages but the pool "
                       f"has {self.num_pages - 1}")

  def can_insert(self, prompt_len: int, max_tokens: int, resumed: int = 0) -> bool:
    """A slot is free and so are the request's admission pages; on demand, also one page of headroom per running
    request (the page each may take next), so that admitting does not force a preemption at once."""
    headroom = len(self._active) if self.page_allocation == "on_demand" else 0
    return (len(self._active) < self.slots
            and self.admission_pages(prompt_len, max_tokens, resumed) + headroom <= self.free_pages)

  def _prefix_hashes(self, prompt: Sequence[int], adapter: int) -> list[bytes]:
    """One hash per page the prompt fills completely: of the adapter and every prompt token up to the page's end."""
    hashes, h = [], hashlib.sha256(adapter.to_bytes(4, "little"))
    for end in range(self.page_size, len(prompt) + 1, self.page_size):
      h.update(np.asarray(prompt[end - self.page_size:end], np.int64).tobytes())
      hashes.append(h.copy().digest())
    return hashes

  def _take_page(self) -> int:
    """A page from the free list, else the least recently used cached page nobody uses (its hash forgotten)."""
    if self._free_pages:
      return self._free_pages.pop()
    page, _ = self._evictable.popitem(last=False)
    del self._cached[self._page_hash.pop(page)], self._refs[page]
    return page

  def _share(self, page: int) -> None:
    self._refs[page] += 1
    self._evictable.pop(page, None)

  # -- the cycle --------------------------------------------------------------------------------------------------

  def insert(self, prompt: Sequence[int], params: SamplingParams, resume: Sequence[int] = ()) -> int | None:
    """Takes a free slot and the request's admission pages. Returns the slot, or None when they are not free now.
    resume: the tokens a preempted request had already generated; they are prefilled after the prompt and count
    toward max_tokens, and sampling continues from the next one (the same keys as if never preempted)."""
    params.validate()
    if params.adapter and not 0 < params.adapter < self.model.spec.lora_bank:
      raise ValueError(f"adapter={params.adapter}: this engine's model holds {max(self.model.spec.lora_bank - 1, 0)} "
                       "LoRA adapters (1-based; 0 is the base model)")
    self.check_fits(prompt, params)
    if len(resume) >= params.max_tokens:
      raise ValueError(f"resume has {len(resume)} tokens: nothing left of max_tokens={params.max_tokens}")
    if not self.can_insert(len(prompt), params.max_tokens, len(resume)):
      return None
    slot = next(s for s in range(self.slots) if s not in self._active)
    hits = []
    if self.prefix_caching:  # cached pages of this prompt, leaving at least its last token to compute
      for h in self._prefix_hashes(prompt[:len(prompt) - 1], params.adapter):
        if h not in self._cached:
          break
        hits.append(self._cached[h])
      for page in hits:
        self._share(page)
    needed = self.admission_pages(len(prompt), params.max_tokens, len(resume))
    pages = hits + [self._take_page() for _ in range(needed - len(hits))]
    self._table[slot] = 0
    self._table[slot, :len(pages)] = pages
    self._admitted += 1
    self._active[slot] = _Slot(list(prompt), params, pages, prefilled=len(hits) * self.page_size,
                               output=list(resume), order=self._admitted, context=len(prompt) + len(resume))
    self.prompt_tokens += len(prompt)
    self.prefix_hit_tokens += len(hits) * self.page_size
    return slot

  def _register_prompt_pages(self, s: _Slot) -> None:
    """Caches the pages the slot's prompt filled completely (its prefill is done), unless equal ones are cached."""
    for page, h in zip(s.pages, self._prefix_hashes(s.prompt, s.params.adapter)):
      if page in self._page_hash:  # shared from the cache already
        continue
      if h not in self._cached:
        self._cached[h], self._page_hash[page], self._refs[page] = page, h, 1

  def is_prefilling(self, slot: int) -> bool:
    s = self._active[slot]
    return s.prefilled < s.context

  def prefill(self, slot: int) -> int | None:
    """Writes the slot's next prompt chunk. Returns the first new token after the last chunk, else None."""
    s = self._active[slot]
    context = s.prompt + s.output  # a resumed request's earlier output follows its prompt
    n = min(self.prefill_chunk, s.context - s.prefilled)
    bucket = self._bucket(n)
    tokens = np.zeros((1, bucket), np.int32)
    live = np.zeros((1, bucket), np.int32)
    positions = np.zeros((1, bucket), np.int32)
    tokens[0, :n] = context[s.prefilled:s.prefilled + n]
    live[0, :n] = 1
    positions[0, :n] = np.arange(s.prefilled, s.prefilled + n)
    s.prefilled += n
    width = self._table_width(s.prefilled)
    table, lengths = self._table[slot:slot + 1, :width], np.array([s.prefilled], np.int32)
    token = self._run(tokens, live, positions, table, lengths, np.array([n - 1], np.int32), [s])[0]
    if self.draft_model is not None:
      self._draft_pages = _draft_prefill(self._draft_graphdef, self._draft_state, self._draft_pages, tokens, live,
                                         positions, table, lengths)
    if s.prefilled < s.context:
      return None
    return self._first_token(slot, int(token), self._row_logprobs[0])

  def _first_token(self, slot: int, token: int, logprob: Logprob) -> int:
    """Records the token sampled after a slot's last prefill chunk (and caches its prompt's pages)."""
    s = self._active[slot]
    if self.prefix_caching:
      self._register_prompt_pages(s)
    s.output.append(token)
    self.logprobs[slot] = [logprob]
    return token

  def step(self) -> dict[int, list[int]]:
    """One iteration in one model call (mixed batches): the next prompt chunks of the prefilling slots, oldest first,
    ride beside one decode token for every decoding slot. Returns {slot: its new tokens}: the first token of a slot
    whose prefill ended, the next token of a decoding slot (`logprobs[slot]` has one entry per token); slots
    preempted for pages are listed in `preempted`.

    The chunks are laid out in rows of `prefill_row` tokens, a chunk over as many consecutive rows as it needs
    (every write of a step lands before any read, so a row sees the rows before it through the pages), at most
    `prefill_rows` rows per step (the `prefill_chunk` budget), padded to a power of two. Rows of one width and page
    tables of one width for both groups (the longest sequence's, rounded up to a power of two: attention reads
    only that many pages) leave few shapes to compile: row counts x table widths, with and without decodes."""
    self.preempted = []
    decoding = self._grow(self._decoding_slots())
    chunks, rows_left, width = [], self.prefill_rows, self.prefill_row
    for slot in sorted((x for x in self._active if self.is_prefilling(x)), key=lambda x: self._active[x].order):
      n = min(rows_left * width, self._active[slot].context - self._active[slot].prefilled)
      if n == 0:
        break
      chunks.append((slot, n))
      rows_left -= -(-n // width)
    if not chunks:
      return self._decode(decoding)
    used = self.prefill_rows - rows_left
    rows = 1 << (used - 1).bit_length()  # a power of two: few shapes to compile
    tokens, live, positions = (np.zeros((rows, width), np.int32) for _ in range(3))
    lengths, last_index = np.zeros((rows,), np.int32), np.zeros((rows,), np.int32)
    table = np.zeros((rows, self.max_pages), np.int32)
    row_slots: list[_Slot | None] = [None] * rows  # the request each prompt row belongs to
    ends, row = {}, 0  # slot -> the row of its chunk's last token
    for slot, n in chunks:
      s = self._active[slot]
      context = s.prompt + s.output
      for start in range(s.prefilled, s.prefilled + n, width):
        m = min(width, s.prefilled + n - start)
        tokens[row, :m], live[row, :m] = context[start:start + m], 1
        positions[row, :m] = np.arange(start, start + m)
        lengths[row], last_index[row], table[row], row_slots[row] = start + m, m - 1, self._table[slot], s
        row += 1
      s.prefilled += n
      ends[slot] = row - 1
    columns = int(lengths.max())  # page-table columns the step reads: one width for both groups
    groups = [(tokens, live, positions, table, lengths, last_index)]
    decode_rows: list[_Slot | None] = []
    if decoding:
      d_tokens, d_live, d_positions, d_lengths, decode_rows = self._decode_inputs(decoding)
      groups.append((d_tokens, d_live, d_positions, np.where(d_live > 0, self._table, 0), d_lengths,
                     np.zeros((self.slots,), np.int32)))
      columns = max(columns, int(d_lengths.max()))
    width = self._table_width(columns)
    groups = [(*g[:3], g[3][:, :width], *g[4:]) for g in groups]
    all_rows = row_slots + decode_rows
    params = [r.params if r is not None else SamplingParams() for r in all_rows]
    counters = np.array([r.generated if r is not None else 0 for r in all_rows], np.int32)
    out, self._pages = _mixed_step(self._graphdef, self._state, self._pages, tuple(groups), counters,
                                   sampling.row_settings(params))
    chosen = self._unpack(out, len(all_rows))
    result = {}
    for slot, row in ends.items():
      if self._active[slot].prefilled == self._active[slot].context:
        result[slot] = [self._first_token(slot, int(chosen[row]), self._row_logprobs[row])]
    for slot in decoding:
      s = self._active[slot]
      s.output.append(int(chosen[rows + slot]))
      result[slot] = [s.last_token]
      self.logprobs[slot] = [self._row_logprobs[rows + slot]]
    return result

  def warmup(self) -> None:
    """Compiles every shape `step` can take (each row count, with and without decodes) on empty rows, which write
    only to the scratch page: a server calls it before it takes requests, so no request waits for a compile."""
    if not self.mixed_batches:
      return
    zeros = lambda *shape: np.zeros(shape, np.int32)  # noqa: E731
    decode = (zeros(self.slots, 1), zeros(self.slots, 1), zeros(self.slots, 1), zeros(self.slots, self.max_pages),
              zeros(self.slots), zeros(self.slots))
    widths = sorted({self._table_width(n) for n in range(1, self.max_len + 1)})
    for rows, width in itertools.product((1 << i for i in range((self.prefill_rows - 1).bit_length() + 1)), widths):
      prefill = (zeros(rows, self.prefill_row), zeros(rows, self.prefill_row), zeros(rows, self.prefill_row),
                 zeros(rows, width), zeros(rows), zeros(rows))
      for groups in ((prefill,), (prefill, (*decode[:3], decode[3][:, :width], *decode[4:]))):
        n = sum(g[0].shape[0] for g in groups)
        out, self._pages = _mixed_step(self._graphdef, self._state, self._pages, groups, zeros(n),
                                       sampling.row_settings([SamplingParams()] * n))
        jax.block_until_ready(out)

  def generate(self) -> dict[int, list[int]]:
    """One decode step for every slot whose prompt is fully prefilled. Returns {slot: its new tokens} (one token,
    or with speculation 1 to draft_tokens + 1); `logprobs[slot]` has one entry per new token."""
    self.preempted = []
    return self._decode(self._grow(self._decoding_slots()))

  def _decoding_slots(self) -> list[int]:
    """Slots whose context is prefilled and whose request is not done (a request may end at its prefill)."""
    return [slot for slot, s in self._active.items() if s.prefilled == s.context and s.generated < s.params.max_tokens]

  def _decode(self, decoding: list[int]) -> dict[int, list[int]]:
    """One decode step (speculative or not) of the given slots, which hold their pages already."""
    if not decoding:
      return {}
    if self.speculate != "none":
      return self._generate_speculative(decoding)
    tokens, live, positions, lengths, rows = self._decode_inputs(decoding)
    table = np.where(live > 0, self._table, 0)[:, :self._table_width(int(lengths.max()))]
    out = self._run(tokens, live, positions, table, lengths, np.zeros((self.slots,), np.int32), rows)
    result = {}
    for slot in decoding:
      s = self._active[slot]
      s.output.append(int(out[slot]))
      result[slot] = [s.last_token]
      self.logprobs[slot] = [self._row_logprobs[slot]]
    return result

  def _decode_inputs(self, decoding: list[int]):
    """The one-token step of the decoding slots: tokens, live, positions [slots, 1], lengths [slots] int32 and the
    rows' `_Slot`s (None for idle slots)."""
    tokens, live, positions = (np.zeros((self.slots, 1), np.int32) for _ in range(3))
    lengths = np.zeros((self.slots,), np.int32)
    rows: list[_Slot | None] = [None] * self.slots
    for slot in decoding:
      s = self._active[slot]
      position = len(s.prompt) + s.generated - 1  # the last sampled token goes to the next free slot
      tokens[slot, 0], live[slot, 0], positions[slot, 0], lengths[slot] = s.last_token, 1, position, position + 1
      rows[slot] = s
    return tokens, live, positions, lengths, rows

  def _generate_speculative(self, decoding: list[int]) -> dict[int, list[int]]:
    k = self.draft_tokens
    history = np.zeros((self.slots, self.max_len), np.int32)
    last_pos = np.full((self.slots,), -1, np.int32)
    budget = np.zeros((self.slots,), np.int32)
    counters = np.zeros((self.slots,), np.int32)
    rows: list[_Slot | None] = [None] * self.slots
    for slot in decoding:
      s = self._active[slot]
      context = s.prompt + s.output
      history[slot, :len(context)] = context
      last_pos[slot] = len(context) - 1
      budget[slot] = self._budget(s)
      counters[slot] = s.generated
      rows[slot] = s
    params = [r.params if r is not None else SamplingParams() for r in rows]
    table = np.where((last_pos >= 0)[:, None], self._table, 0)[:, :self._table_width(int((last_pos + 1 + budget).max()))]
    out, self._pages, self._draft_pages = _speculative_step(
        self._graphdef, self._state, self._pages, self._draft_graphdef, self._draft_state, self._draft_pages, history,
        last_pos, budget, table, counters, sampling.row_settings(params),
        np.array([p.adapter for p in params], np.int32), k=k, ngram=self.ngram)
    accepted, tokens, lp, top_lp, top_ids = jax.device_get(out)
    result = {}
    for slot in decoding:
      s, n = self._active[slot], int(accepted[slot]) + 1
      s.output.extend(int(t) for t in tokens[slot, :n])
      result[slot] = [int(t) for t in tokens[slot, :n]]
      self.logprobs[slot] = [(float(lp[slot, j]), tuple(zip(map(int, top_ids[slot, j]), map(float, top_lp[slot, j]))))
                             for j in range(n)]
      self.speculative_rounds += 1
      self.drafts_proposed += int(budget[slot])
      self.drafts_accepted += n - 1
    return result

  def _grow(self, decoding: list[int]) -> list[int]:
    """Gives each decoding slot the pages its next step writes (oldest request first); when the pool runs out,
    preempts the newest running request (its pages freed; the scheduler queues it again to be recomputed) until the
    older ones fit. Returns the decoding slots still running."""
    for slot in sorted(decoding, key=lambda x: self._active[x].order):
      if slot not in self._active:  # preempted for an older request
        continue
      s = self._active[slot]
      last = len(s.prompt) + s.generated - 1 + self._budget(s)  # the last position this step writes
      needed = last // self.page_size + 1
      while len(s.pages) < needed and slot in self._active:
        if self.free_pages == 0:
          self._preempt(max(self._active, key=lambda x: self._active[x].order))
          continue
        page = self._take_page()
        self._table[slot, len(s.pages)] = page
        s.pages.append(page)
    return [slot for slot in decoding if slot in self._active]

  def _budget(self, s: _Slot) -> int:
    """Drafts the request may verify this step: k with speculation, fewer near max_tokens (never past its pages)."""
    return 0 if self.speculate == "none" else min(self.draft_tokens, s.params.max_tokens - s.generated - 1)

  def _preempt(self, slot: int) -> None:
    self.release(slot)
    self.preempted.append(slot)
    self.preemptions += 1

  def release(self, slot: int) -> None:
    """Frees the slot and returns its pages (finished or cancelled request)."""
    s = self._active.pop(slot)
    self.logprobs.pop(slot, None)
    for page in reversed(s.pages):
      if page not in self._page_hash:
        self._free_pages.append(page)
        continue
      self._refs[page] -= 1
      if self._refs[page] == 0:  # stays cached until its page is needed (most recently used last)
        self._evictable[page] = None
    self._table[slot] = 0

  # -- internals --------------------------------------------------------------------------------------------------

  def _table_width(self, longest: int) -> int:
    """Page-table columns a step reads: the longest sequence's pages rounded up to a power of two (a few shapes to
    compile, and attention over short sequences does not pay for the whole context)."""
    return min(self.max_pages, 1 << (math.ceil(longest / self.page_size) - 1).bit_length())

  def _run(self, tokens, live, positions, table, lengths, last_index, rows: Sequence[_Slot | None]) -> np.ndarray:
    params = [r.params if r is not None else SamplingParams() for r in rows]
    counters = np.array([r.generated if r is not None else 0 for r in rows], np.int32)
    adapters = np.array([p.adapter for p in params], np.int32)
    out, self._pages = _step(self._graphdef, self._state, self._pages, tokens, live, positions, table, lengths,
                             last_index, counters, sampling.row_settings(params), adapters)
    return self._unpack(out, len(rows))

  def _unpack(self, out, rows: int) -> np.ndarray:
    """`_sample`'s device tuple -> the chosen tokens [rows] (their log-probabilities kept in `_row_logprobs`)."""
    chosen, lp, top_lp, top_ids = jax.device_get(out)
    self._row_logprobs = [(float(lp[i]), tuple(zip(map(int, top_ids[i]), map(float, top_lp[i]))))
                          for i in range(rows)]
    return np.asarray(chosen)

  def _bucket(self, n: int) -> int:
    """Tokens per row of a prefill chunk of n: a power of two >= 16, or the chunk limit (few shapes to compile)."""
    return max(n, min(max(16, 1 << (n - 1).bit_length()), max(16, self.prefill_chunk)))
