"""Serving benchmark: a loopback load generator against `infer.serve`, continuous vs static batching.

For each batching mode the same engine settings serve the same request mix: prompts of random token ids with
lengths drawn from --prompt_lengths and output lengths from --output_lengths (`ignore_eos`, so every request
produces exactly its output length), sent by --concurrency closed-loop clients until --requests have finished or
--max_seconds have passed. Every request streams, so the client measures time to first token (TTFT) and time per
output token after the first (TPOT, a mean per request) and the gaps between tokens (inter-token latency, ITL) itself. Prefill buckets and the decode step are compiled by a warm-up before the
clock starts. The server runs in its own process (`python -m infer.serve`) and is stopped with SIGTERM, which drains it.
Prints a table and writes JSON.

  python -m scripts.bench_serve --workdir=runs/default [--requests=48] [--concurrency=16] [--slots=8]
      [--modes=continuous,static] [--out=bench_serve.json]

Speculative decoding in the engine off and on (prompt lookup, or a draft model with --draft_workdir):

  python -m scripts.bench_serve --modes=continuous --speculate=none,lookup [--draft_tokens=4]

On-demand pages against reserving every page at admission, from the same small pool (mixed lengths), and under
bursty arrivals (16 requests at once every 2 s); the table adds the running requests and used pages (mean / max,
polled from /metrics) and the preemptions:

  python -m scripts.bench_serve --modes=continuous --page_allocation=reserve,on_demand --slots=16 --num_pages=49 \
      --declared_max_tokens=160
  python -m scripts.bench_serve --modes=continuous --burst=16 --burst_interval=2 --prefill_chunk=32

Mixed batches off and on under bursty arrivals (the prefill chunks of new requests in their own calls before each
decode step, or riding in it):

  python -m scripts.bench_serve --modes=continuous --mixed_batches=off,on --prefill_chunk=0,64,32 --slots=16 \
      --burst=16 --burst_interval=2 --requests=64 --prompt_lengths=64,192 --output_lengths=32,64

Shared system prompt, prefix caching off and on (every prompt starts with the same 192 tokens):

  python -m scripts.bench_serve --modes=continuous --prefix_caching=off,on --shared_prefix=192 \
      --prompt_lengths=8,32 --output_lengths=8,32
"""

from __future__ import annotations

import itertools
import json

import jax
from absl import app, flags

from configs.base import MATMUL_IMPLS
from infer.engine import PAGE_ALLOCATIONS
from infer.speculative import SPECULATE
from scripts import serve_load
from workdir import layout

_WORKDIR = flags.DEFINE_string("workdir", "runs/default", "Trained workdir to serve.")
_REQUESTS = flags.DEFINE_integer("requests", 48, "Requests per mode.")
_CONCURRENCY = flags.DEFINE_integer("concurrency", 16, "Closed-loop clients.")
_MAX_SECONDS = flags.DEFINE_float("max_seconds", 300.0, "Stop sending after this long (per mode).")
_SLOTS = flags.DEFINE_integer("slots", 8, "Engine slots (the decode batch).")
_PAGE_SIZE = flags.DEFINE_integer("page_size", 16, "KV page size.")
_PREFILL_CHUNK = flags.DEFINE_list("prefill_chunk", ["0"], "Prefill chunks to compare: prompt tokens per prefill call, "
                                   "or with mixed batches per step (0: whole prompts).")
_MODES = flags.DEFINE_list("modes", ["continuous", "static"], "Batching modes to compare.")
_PROMPT_LENGTHS = flags.DEFINE_list("prompt_lengths", ["8", "96"], "Prompt length range [lo, hi] in tokens.")
_OUTPUT_LENGTHS = flags.DEFINE_list("output_lengths", ["8", "128"], "Output length range [lo, hi] in tokens.")
_ATTENTION = flags.DEFINE_enum("attention_impl", None, ["xla", "pallas"], "Override model.attention_impl.")
_MATMUL = flags.DEFINE_list("matmul_impl", ["auto"], "model.matmul_impl settings to compare (auto: the native CPU "
                            "kernels where built, paged decode attention included; xla: none).")
_SEED = flags.DEFINE_integer("seed", 0, "Request mix seed.")
_PREFIX_CACHING = flags.DEFINE_list("prefix_caching", ["off"], "Prefix caching settings to compare (off, on).")
_SHARED_PREFIX = flags.DEFINE_integer("shared_prefix", 0, "Tokens of one common prompt start shared by every request.")
_NUM_PAGES = flags.DEFINE_integer("num_pages", 0, "KV pages in the pool (0: enough for every slot at full context).")
_MIXED = flags.DEFINE_list("mixed_batches", ["on"], "Mixed batches to compare (on: prefill chunks ride in the decode "
                           "step's call; off: one call per prefill chunk before the decode step).")
_ALLOCATION = flags.DEFINE_list("page_allocation", ["on_demand"], "Page allocations to compare (on_demand, reserve).")
_DECLARED = flags.DEFINE_integer("declared_max_tokens", 0, "> 0: every request asks for this many tokens and its client "
                                 "disconnects after its own output length (requests that end early, lengths unknown "
                                 "to the server).")
_BURST = flags.DEFINE_integer("burst", 0, "> 0: open-loop bursts of this many requests (instead of closed-loop clients).")
_BURST_INTERVAL = flags.DEFINE_float("burst_interval", 2.0, "--burst: seconds between bursts.")
_SPECULATE = flags.DEFINE_list("speculate", ["none"], "Speculative decoding settings to compare (none, lookup, draft).")
_DRAFT_TOKENS = flags.DEFINE_integer("draft_tokens", 4, "--speculate: drafts verified per request and step.")
_DRAFT_WORKDIR = flags.DEFINE_string("draft_workdir", "", "--speculate=draft: the draft model's run.")
_OUT = flags.DEFINE_string("out", "bench_serve.json", "Where to write the JSON results.")
_PROFILE = flags.DEFINE_string("profile", "", "A directory: trace the server during each mode's timed load there "
                               "(TensorBoard/Perfetto, one subdirectory per mode) and print its top operations.")


def settings(mode: str, prefix_caching: bool = False, speculate: str = "none",
             page_allocation: str = "on_demand", mixed_batches: bool = True,
             prefill_chunk: int = 0, matmul_impl: str = "auto") -> serve_load.Settings:
  """The flags as load settings for one batching mode, prefix-caching, speculation, page-allocation and mixed-batch
  setting."""
  return serve_load.Settings(workdir=_WORKDIR.value, mode=mode, slots=_SLOTS.value, page_size=_PAGE_SIZE.value,
                             prefill_chunk=prefill_chunk, requests=_REQUESTS.value,
                             concurrency=_CONCURRENCY.value, max_seconds=_MAX_SECONDS.value,
                             prompt_lengths=tuple(map(int, _PROMPT_LENGTHS.value)),
                             output_lengths=tuple(map(int, _OUTPUT_LENGTHS.value)), attention_impl=_ATTENTION.value,
                             seed=_SEED.value, profile=_PROFILE.value, prefix_caching=prefix_caching,
                             shared_prefix=_SHARED_PREFIX.value, speculate=speculate,
                             draft_tokens=_DRAFT_TOKENS.value, draft_workdir=_DRAFT_WORKDIR.value,
                             num_pages=_NUM_PAGES.value, page_allocation=page_allocation, burst=_BURST.value,
                             burst_interval=_BURST_INTERVAL.value, declared_max_tokens=_DECLARED.value,
                             mixed_batches=mixed_batches, matmul_impl=matmul_impl)


def main(argv):
  del argv
  model_config = layout.load_config(_WORKDIR.value).model
  rows = []
  for value in _PREFIX_CACHING.value:
    if value not in ("off", "on"):
      raise app.UsageError(f"--prefix_caching={value!r}: each value must be off or on")
  for value in _SPECULATE.value:
    if value not in SPECULATE:
      raise app.UsageError(f"--speculate={value!r}: each value must be one of {list(SPECULATE)}")
  for value in _ALLOCATION.value:
    if value not in PAGE_ALLOCATIONS:
      raise app.UsageError(f"--page_allocation={value!r}: each value must be one of {list(PAGE_ALLOCATIONS)}")
  for value in _MIXED.value:
    if value not in ("off", "on"):
      raise app.UsageError(f"--mixed_batches={value!r}: each value must be off or on")
  chunks = []
  for value in _PREFILL_CHUNK.value:
    if not value.isdigit():
      raise app.UsageError(f"--prefill_chunk={value!r}: each value must be a number of tokens >= 0")
    chunks.append(int(value))
  for value in _MATMUL.value:
    if value not in MATMUL_IMPLS:
      raise app.UsageError(f"--matmul_impl={value!r}: each value must be one of {list(MATMUL_IMPLS)}")
  for matmul, mode, caching, speculate, allocation, mixed, chunk in itertools.product(
      _MATMUL.value, _MODES.value, _PREFIX_CACHING.value, _SPECULATE.value, _ALLOCATION.value, _MIXED.value, chunks):
    rows.append(serve_load.bench_mode(settings(mode, caching == "on", speculate, allocation, mixed == "on", chunk,
                                               matmul), model_config.vocab_size, model_config.max_len))
    print(json.dumps(rows[-1]), flush=True)
  print(f"\nserving {_WORKDIR.value} on {jax.devices()[0].device_kind} (server in its own process): "
        f"{_REQUESTS.value} requests, {_CONCURRENCY.value} clients, {_SLOTS.value} slots, "
        f"prompts {'-'.join(_PROMPT_LENGTHS.value)} tokens, "
        f"outputs {'-'.join(_OUTPUT_LENGTHS.value)} tokens, shared prefix {_SHARED_PREFIX.value} tokens, "
        + (f"bursts of {_BURST.value} every {_BURST_INTERVAL.value:g} s" if _BURST.value else "closed loop")
        + f", pool {_NUM_PAGES.value or 'full'} pages")
  print("| matmul_impl | mode | mixed batches | prefill chunk | pages | prefix caching | speculation (acceptance) | requests | req/s | output tok/s | "
        "TTFT p50 / p99 (s) | TPOT p50 / p99 (ms) | ITL p99 (ms) | running mean / max | used pages mean / max | preemptions |")
  print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
  for r in rows:
    tpot = f"{1e3 * r['tpot_p50_s']:.1f} / {1e3 * r['tpot_p99_s']:.1f}"
    spec = r["speculate"] if r["speculate"] == "none" else f"{r['speculate']} k={r['draft_tokens']} ({r['acceptance_rate']:.2f})"
    print(f"| {r['matmul_impl']} | {r['mode']} | {'on' if r['mixed_batches'] else 'off'} | {r['prefill_chunk'] or 'whole'} | "
          f"{r['page_allocation']} | {'on' if r['prefix_caching'] else 'off'} | {spec} | "
          f"{r['requests']} | {r['requests_per_s']:.2f} | {r['output_tokens_per_s']:.1f} | "
          f"{r['ttft_p50_s']:.2f} / {r['ttft_p99_s']:.2f} | {tpot} | {1e3 * r['itl_p99_s']:.1f} | {r['running_requests_mean']:.1f} / "
          f"{r['running_requests_max']:.0f} | {r['used_pages_mean']:.1f} / {r['used_pages_max']:.0f} | "
          f"{r['preemptions']:.0f} |")
  separate = {(r["mode"], r["matmul_impl"]): r for r in rows
              if not r["mixed_batches"] and r["prefill_chunk"] == chunks[0]}
  for r in rows:
    if r["mixed_batches"] and (r["mode"], r["matmul_impl"]) in separate:
      base = separate[(r["mode"], r["matmul_impl"])]
      r["tpot_p99_mixed_over_separate"] = r["tpot_p99_s"] / base["tpot_p99_s"]
      r["itl_p99_mixed_over_separate"] = r["itl_p99_s"] / base["itl_p99_s"]
      print(f"{r['mode']}, matmul_impl={r['matmul_impl']}: mixed (chunk {r['prefill_chunk'] or 'whole'}) / separate prefill calls (chunk "
            f"{chunks[0] or 'whole'}): TPOT p99 {r['tpot_p99_mixed_over_separate']:.2f}x, inter-token latency p99 "
            f"{r['itl_p99_mixed_over_separate']:.2f}x, "
            f"TPOT p50 {r['tpot_p50_s'] / base['tpot_p50_s']:.2f}x, TTFT p50 {r['ttft_p50_s'] / base['ttft_p50_s']:.2f}x, "
            f"throughput {r['output_tokens_per_s'] / base['output_tokens_per_s']:.2f}x")
  # the other comparisons hold matmul_impl at its first value
  first_matmul = [r for r in rows if r["matmul_impl"] == _MATMUL.value[0]]
  reserved = {r["mode"]: r for r in first_matmul if r["page_allocation"] == "reserve"}
  for r in first_matmul:
    if r["page_allocation"] == "on_demand" and r["mode"] in reserved:
      base = reserved[r["mode"]]
      r["running_over_reserve"] = r["running_requests_mean"] / base["running_requests_mean"]
      print(f"{r['mode']}: running requests on demand / reserved: {r['running_over_reserve']:.2f}x (mean), TPOT p99 "
            f"{r['tpot_p99_s'] / base['tpot_p99_s']:.2f}x, throughput "
            f"{r['output_tokens_per_s'] / base['output_tokens_per_s']:.2f}x")
  plain = [r for r in first_matmul if r["speculate"] == "none" and r["page_allocation"] == _ALLOCATION.value[0]
           and r["mixed_batches"] == (_MIXED.value[0] == "on") and r["prefill_chunk"] == chunks[0]]
  by_mode = {r["mode"]: r for r in plain if not r["prefix_caching"]}
  cached = {r["mode"]: r for r in plain if r["prefix_caching"]}
  for r in first_matmul:
    base = by_mode.get(r["mode"]) if not r["prefix_caching"] else cached.get(r["mode"])
    if r["speculate"] != "none" and base is not None:
      r["throughput_over_no_speculation"] = r["output_tokens_per_s"] / base["output_tokens_per_s"]
      print(f"{r['mode']}, speculate={r['speculate']}: output throughput {r['throughput_over_no_speculation']:.2f}x "
            "ordinary decoding")
  result = {"device": jax.devices()[0].device_kind, "workdir": _WORKDIR.value, "slots": _SLOTS.value,
            "concurrency": _CONCURRENCY.value, "modes": rows}
  if {"continuous", "static"} <= set(by_mode):
    ratio = by_mode["continuous"]["output_tokens_per_s"] / by_mode["static"]["output_tokens_per_s"]
    result["continuous_over_static_throughput"] = ratio
    print(f"continuous / static output throughput: {ratio:.2f}x")
  for mode in set(by_mode) & set(cached):
    ratio = cached[mode]["ttft_p50_s"] / by_mode[mode]["ttft_p50_s"]
    result[f"{mode}_ttft_p50_prefix_caching_over_off"] = ratio
    print(f"{mode}: TTFT p50 with prefix caching / without: {ratio:.2f}x")
  with open(_OUT.value, "w", encoding="utf-8") as f:
    json.dump(result, f, indent=1)


if __name__ == "__main__":
  app.run(main)
