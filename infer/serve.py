"""Serve a trained (or quantized) workdir over HTTP with continuous batching: `python -m infer.serve --workdir=DIR`.

  python -m infer.serve --workdir=runs/default [--port=8000] [--slots=8] [--page_size=16] [--num_pages=0]
      [--prefill_chunk=0] [--max_queue=64] [--queue_timeout=300] [--request_timeout=0] [--mode=continuous|static]
      [--attention_impl=xla|pallas] [--head_quant=int8] [--prefix_caching]
      [--page_allocation=on_demand|reserve] [--mixed_batches=true|false] [--warmup] [--compilation_cache=DIR] [--speculate=none|lookup|draft] [--draft_tokens=4] [--ngram=3] [--draft_workdir=DIR]

SIGTERM (or Ctrl-C) drains: new requests get 503 while those in flight finish, then the process exits.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time

import jax
from absl import app, flags
from aiohttp import web

from configs import base
from infer import loading
from infer import speculative
from infer.engine import MIXED_STEP_TOKENS, PAGE_ALLOCATIONS, Engine
from infer.scheduler import Scheduler
from infer.server import Metrics, Server
from workdir import tokenizer as tokenizer_lib
from train import allocator
from train import sft
from workdir import layout


def build(workdir: str, *, slots: int = 8, page_size: int = 16, num_pages: int = 0, prefill_chunk: int = 0,
          max_queue: int = 64, queue_timeout: float = 0.0, request_timeout: float = 0.0,
          mode: str = "continuous", attention_impl: str | None = None,
          matmul_impl: str | None = None, step: int | None = None, api_key: str | None = None,
          profile_dir: str | None = None, head_quant: str | None = None, adapter: str | None = None,
          adapters: dict[str, str] | None = None, prefix_caching: bool = False, speculate: str = "none",
          draft_tokens: int = 4, ngram: int = 3, draft_workdir: str | None = None,
          page_allocation: str = "on_demand", mixed_batches: bool = True, warmup: bool = True) -> Server:
  """Loads `workdir` and wires engine, scheduler (started), metrics and server together. `adapter`: a LoRA adapter
  merged into the model; `adapters` {model id: adapter path}: a bank the requests pick from by their `model` field
  (the workdir's own id is the base model). `speculate`: speculative decoding in the engine (prompt lookup, or a
  draft model loaded from `draft_workdir`, a run with the same tokenizer). `warmup`: compile every mixed-batch step
  shape before taking requests."""
  _, model, tokenizer, _ = loading.load_trained(workdir, step, matmul_impl, attention_impl, head_quant=head_quant,
                                                adapter=adapter)
  if adapters:
    model = loading.with_adapter_bank(model, list(adapters.values()))
    print(f"LoRA adapters served by request: {', '.join(adapters)} (rank {model.spec.lora_rank})", flush=True)
  print(loading.weights_note(model), flush=True)
  draft_model = loading.load_trained(draft_workdir)[1] if draft_workdir and speculate == "draft" else None
  engine = Engine(model, slots=slots, page_size=page_size, num_pages=num_pages or None,
                  prefill_chunk=prefill_chunk or None, prefix_caching=prefix_caching, speculate=speculate,
                  draft_tokens=draft_tokens, ngram=ngram, draft_model=draft_model, page_allocation=page_allocation,
                  mixed_batches=mixed_batches)
  if engine.mixed_batches and warmup:
    start = time.perf_counter()
    engine.warmup()
    print(f"mixed-batch steps compiled in {time.perf_counter() - start:.1f} s (prefill rows of {engine.prefill_row} "
          f"tokens, up to {engine.prefill_rows} per step)", flush=True)
  scheduler = Scheduler(engine, lambda ids: tokenizer_lib.decode(tokenizer, ids), mode=mode, max_queue=max_queue,
                        queue_timeout=queue_timeout, request_timeout=request_timeout)
  metrics = Metrics(scheduler)
  scheduler.on_finish = metrics.on_finish
  scheduler.start()
  template = sft.chat_template(layout.path(workdir, layout.TOKENIZER), tokenizer)  # for /v1/chat/completions
  return Server(scheduler, tokenizer, os.path.basename(os.path.normpath(workdir)), metrics, api_key=api_key,
                profile_dir=profile_dir, adapter_ids=tuple(adapters or ()), chat_template=template)


async def _serve(server: Server, host: str, port: int, drain_timeout: float) -> None:
  runner = web.AppRunner(server.app(), handler_cancellation=True)
  await runner.setup()
  await web.TCPSite(runner, host, port, backlog=1024).start()
  print(f"serving {server.model_id} on http://{host}:{port} (POST /v1/completions, GET /v1/models, /health, "
        "/metrics)", flush=True)
  stop = asyncio.Event()
  loop = asyncio.get_running_loop()
  for sig in (signal.SIGTERM, signal.SIGINT):
    loop.add_signal_handler(sig, stop.set)
  await stop.wait()
  server.draining = True
  print("draining: new requests get 503 while those in flight finish", flush=True)
  drained = await loop.run_in_executor(None, server.scheduler.drain, drain_timeout)
  await runner.cleanup()
  server.scheduler.stop()
  print("drained" if drained else f"drain timed out after {drain_timeout}s", flush=True)


def _adapter_flags(values: list[str] | None) -> dict:
  """--adapter values -> build()'s adapter (one unnamed PATH, merged) or adapters ({NAME: PATH})."""
  values = values or []
  named = [v for v in values if "=" in v and not os.path.exists(v)]
  if not named:
    if len(values) > 1:
      raise ValueError(f"--adapter: {len(values)} unnamed adapters; name each to serve several (--adapter=NAME=PATH)")
    return {"adapter": values[0] if values else None}
  if len(named) != len(values):
    raise ValueError("--adapter: name every adapter (NAME=PATH) when serving several")
  pairs = dict(v.split("=", 1) for v in values)
  if len(pairs) != len(values):
    raise ValueError(f"--adapter: names repeat in {values}")
  return {"adapters": pairs}


def main(argv):
  if len(argv) > 1:
    sys.exit(f"error: unexpected arguments {argv[1:]}")
  f = flags.FLAGS
  if f.compilation_cache:  # compiled steps persist across restarts: the warm-up then takes seconds
    jax.config.update("jax_compilation_cache_dir", f.compilation_cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
  try:
    server = build(f.workdir, slots=f.slots, page_size=f.page_size, num_pages=f.num_pages,
                   prefill_chunk=f.prefill_chunk, max_queue=f.max_queue, queue_timeout=f.queue_timeout,
                   request_timeout=f.request_timeout, mode=f.mode, attention_impl=f.attention_impl,
                   matmul_impl=f.matmul_impl, step=f.step, api_key=f.api_key or os.environ.get("PEAKLLM_API_KEY"),
                   profile_dir=f.profile_dir or None, head_quant=f.head_quant, prefix_caching=f.prefix_caching,
                   speculate=f.speculate, draft_tokens=f.draft_tokens, ngram=f.ngram, draft_workdir=f.draft_workdir,
                   page_allocation=f.page_allocation, mixed_batches=f.mixed_batches, warmup=f.warmup,
                   **_adapter_flags(f.adapter))
  except (FileNotFoundError, ValueError) as e:
    sys.exit(f"error: cannot serve --workdir={f.workdir}: {e}")
  asyncio.run(_serve(server, f.host, f.port, f.drain_timeout))


def _define_flags():
  flags.DEFINE_string("workdir", None, "Training run directory (float, quantized or compressed).")
  flags.DEFINE_string("host", "127.0.0.1", "Interface to listen on.")
  flags.DEFINE_integer("port", 8000, "Port to listen on.")
  flags.DEFINE_integer("slots", 8, "Concurrent sequences (the decode batch).")
  flags.DEFINE_integer("page_size", 16, "KV-cache slots per page (a power of two >= 16).")
  flags.DEFINE_integer("num_pages", 0, "KV pages in the pool (0: enough for every slot at full context).")
  flags.DEFINE_integer("prefill_chunk", 0, "Most prompt tokens per prefill call, or with --mixed_batches per step, "
                       "shared by the prefilling requests (0: whole prompts; with --mixed_batches "
                       f"{MIXED_STEP_TOKENS} per step).")
  flags.DEFINE_bool("mixed_batches", True, "Prefill chunks of new requests ride in the same model call as the "
                    "running requests' decode tokens (several waiting prompts batched); off: each prefill chunk is a "
                    "call of its own before the decode step. Not with --speculate or --adapter banks.")
  flags.DEFINE_enum("page_allocation", "on_demand", list(PAGE_ALLOCATIONS), "on_demand: requests take KV pages as "
                    "they grow, and the newest is preempted (recomputed later) when the pool runs out; reserve: every "
                    "page a request could need is taken when it is admitted.")
  flags.DEFINE_bool("prefix_caching", False, "Share the KV pages of equal prompt prefixes between requests "
                    "(content-hashed full pages, reference counts, least recently used evicted first).")
  flags.DEFINE_enum("speculate", "none", list(speculative.SPECULATE), "Speculative decoding: lookup (drafts copied "
                    "from n-grams of each request's context) or draft (a draft model, --draft_workdir).")
  flags.DEFINE_integer("draft_tokens", 4, "--speculate: drafts verified per request and model call.")
  flags.DEFINE_integer("ngram", 3, "--speculate=lookup: the longest context suffix looked up.")
  flags.DEFINE_string("draft_workdir", None, "--speculate=draft: a smaller run trained with the same tokenizer.")
  flags.DEFINE_bool("warmup", True, "--mixed_batches: compile every step shape (prefill rows x page-table widths) "
                    "before taking requests, so that no request waits for a compile.")
  flags.DEFINE_string("compilation_cache", os.path.join(os.environ.get("PEAKLLM_CACHE", os.path.expanduser(
      "~/.cache/peakllm")), "xla"), "JAX's persistent compilation cache directory: the compiled steps are kept "
                      "across restarts (empty: off).")
  flags.DEFINE_integer("max_queue", 64, "Waiting requests beyond which the server answers 429.")
  flags.DEFINE_float("queue_timeout", 300.0, "Seconds a request may wait for a free slot before it gets 503 "
                     "(0: no limit).")
  flags.DEFINE_float("request_timeout", 0.0, "Seconds from arrival to the last token before a request is ended "
                     "with 504 and its slot freed (0: no limit).")
  flags.DEFINE_enum("mode", "continuous", ["continuous", "static"], "Batching mode.")
  flags.DEFINE_enum("attention_impl", None, ["xla", "pallas"], "Override model.attention_impl.")
  flags.DEFINE_enum("matmul_impl", None, list(base.MATMUL_IMPLS), "Override model.matmul_impl.")
  flags.DEFINE_multi_string("adapter", None, "LoRA adapters over --workdir (a PEFT directory or a LoRA training run):"
                            " one PATH is merged into the model; NAME=PATH (repeatable) serves each adapter under "
                            "the model id NAME, picked per request, beside the base.")
  flags.DEFINE_enum("head_quant", None, list(base.HEAD_QUANTS), "Serve a packed compressed workdir's float embedding and head as int8 rows (smaller, faster; not lossless).")
  flags.DEFINE_integer("step", None, "Checkpoint step (default: latest).")
  flags.DEFINE_string("api_key", "", "Require 'Authorization: Bearer <key>' on /v1/* (default: $PEAKLLM_API_KEY; "
                      "empty: no key).")
  flags.DEFINE_string("profile_dir", "", "Enable POST /debug/profile/start and /debug/profile/stop: a jax.profiler "
                      "trace of the engine between them, written here (scripts.bench_serve --profile uses it).")
  flags.DEFINE_float("drain_timeout", 300.0, "Seconds to wait for requests in flight on SIGTERM.")
  flags.mark_flag_as_required("workdir")


if __name__ == "__main__":
  allocator.reexec_with_tcmalloc("infer.serve")  # XLA CPU temporaries without page faults (train/allocator.py)
  _define_flags()
  app.run(main)
