"""Serving benchmark: a loopback load generator against `infer.serve`, continuous vs static batching.

For each batching mode the same engine settings serve the same request mix: prompts of random token ids with
lengths drawn from --prompt_lengths and output lengths from --output_lengths (`ignore_eos`, so every request
produces exactly its output length), sent by --concurrency closed-loop clients until --requests have finished or
--max_seconds have passed. Every request streams, so the client measures time to first token (TTFT) and time per
output token after the first (TPOT) itself. Prefill buckets and the decode step are compiled by a warm-up before the
clock starts. The server runs in its own process (`python -m infer.serve`) and is stopped with SIGTERM, which drains it.
Prints a table and writes JSON.

  python -m scripts.bench_serve --workdir=runs/default [--requests=48] [--concurrency=16] [--slots=8]
      [--modes=continuous,static] [--out=bench_serve.json]
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.request

import aiohttp
import jax
from absl import app, flags

from workdir import layout

_WORKDIR = flags.DEFINE_string("workdir", "runs/default", "Trained workdir to serve.")
_REQUESTS = flags.DEFINE_integer("requests", 48, "Requests per mode.")
_CONCURRENCY = flags.DEFINE_integer("concurrency", 16, "Closed-loop clients.")
_MAX_SECONDS = flags.DEFINE_float("max_seconds", 300.0, "Stop sending after this long (per mode).")
_SLOTS = flags.DEFINE_integer("slots", 8, "Engine slots (the decode batch).")
_PAGE_SIZE = flags.DEFINE_integer("page_size", 16, "KV page size.")
_PREFILL_CHUNK = flags.DEFINE_integer("prefill_chunk", 0, "Prefill chunk (0: whole prompts).")
_MODES = flags.DEFINE_list("modes", ["continuous", "static"], "Batching modes to compare.")
_PROMPT_LENGTHS = flags.DEFINE_list("prompt_lengths", ["8", "96"], "Prompt length range [lo, hi] in tokens.")
_OUTPUT_LENGTHS = flags.DEFINE_list("output_lengths", ["8", "128"], "Output length range [lo, hi] in tokens.")
_ATTENTION = flags.DEFINE_enum("attention_impl", None, ["xla", "pallas"], "Override model.attention_impl.")
_SEED = flags.DEFINE_integer("seed", 0, "Request mix seed.")
_OUT = flags.DEFINE_string("out", "bench_serve.json", "Where to write the JSON results.")
_PROFILE = flags.DEFINE_string("profile", "", "A directory: trace the server during each mode's timed load there "
                               "(TensorBoard/Perfetto, one subdirectory per mode) and print its top operations.")


def request_mix(n: int, vocab: int, max_len: int, seed: int) -> list[dict]:
  rng = random.Random(seed)
  (p_lo, p_hi), (o_lo, o_hi) = map(int, _PROMPT_LENGTHS.value), map(int, _OUTPUT_LENGTHS.value)
  mix = []
  for _ in range(n):
    prompt_len = rng.randint(p_lo, p_hi)
    out_len = min(rng.randint(o_lo, o_hi), max_len - prompt_len)
    mix.append({"prompt": [rng.randrange(1, vocab) for _ in range(prompt_len)], "max_tokens": out_len,
                "temperature": 0, "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}})
  return mix


async def _one(session: aiohttp.ClientSession, url: str, body: dict) -> dict:
  start = time.perf_counter()
  first = None
  tokens = 0
  async with session.post(url + "/v1/completions", json=body) as response:
    if response.status != 200:
      return {"status": response.status}
    async for line in response.content:
      line = line.strip()
      if not line.startswith(b"data: ") or line == b"data: [DONE]":
        continue
      event = json.loads(line[6:])
      if event["choices"] and first is None:
        first = time.perf_counter()
      if event.get("usage"):
        tokens = event["usage"]["completion_tokens"]
  end = time.perf_counter()
  return {"status": 200, "ttft": first - start, "tpot": (end - first) / max(tokens - 1, 1), "tokens": tokens,
          "latency": end - start}


async def run_load(url: str, mix: list[dict], concurrency: int, max_seconds: float) -> tuple[list[dict], float]:
  queue = list(reversed(mix))
  results: list[dict] = []
  start = time.perf_counter()

  async def client(session):
    while queue and time.perf_counter() - start < max_seconds:
      results.append(await _one(session, url, queue.pop()))

  async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0),
                                   timeout=aiohttp.ClientTimeout(total=None)) as session:
    await asyncio.gather(*(client(session) for _ in range(concurrency)))
  return results, time.perf_counter() - start


def _pct(values: list[float], q: float) -> float:
  return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


def _free_port() -> int:
  with socket.socket() as sock:
    sock.bind(("127.0.0.1", 0))
    return sock.getsockname()[1]


def _start_server(mode: str, port: int) -> subprocess.Popen:
  """`python -m infer.serve` in its own process (as in production: the load generator does not share its GIL)."""
  cmd = [sys.executable, "-m", "infer.serve", f"--workdir={_WORKDIR.value}", f"--port={port}", f"--mode={mode}",
         f"--slots={_SLOTS.value}", f"--page_size={_PAGE_SIZE.value}", f"--prefill_chunk={_PREFILL_CHUNK.value}",
         f"--max_queue={max(64, _CONCURRENCY.value)}"]
  if _ATTENTION.value:
    cmd.append(f"--attention_impl={_ATTENTION.value}")
  if _PROFILE.value:
    cmd.append(f"--profile_dir={os.path.abspath(os.path.join(_PROFILE.value, mode))}")
  proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  deadline = time.time() + 300
  while time.time() < deadline:
    if proc.poll() is not None:
      raise RuntimeError(f"the server exited with {proc.returncode}:\n{proc.stdout.read()}")
    try:
      with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
        if r.status == 200:
          return proc
    except OSError:
      time.sleep(0.5)
  proc.kill()
  raise RuntimeError("the server did not become healthy within 300 s")


def bench_mode(mode: str, vocab: int, max_len: int) -> dict:
  port = _free_port()
  url = f"http://127.0.0.1:{port}"
  proc = _start_server(mode, port)
  try:
    warm = [{"prompt": [1] * n, "max_tokens": 2, "temperature": 0, "ignore_eos": True, "stream": True}
            for n in (8, 24, 48, 96, 160) if n + 2 <= max_len]
    asyncio.run(run_load(url, warm, 1, 600))  # compiles the prefill buckets and the decode step
    mix = request_mix(_REQUESTS.value, vocab, max_len, _SEED.value)
    if _PROFILE.value:
      urllib.request.urlopen(urllib.request.Request(url + "/debug/profile/start", method="POST"), timeout=60)
    results, seconds = asyncio.run(run_load(url, mix, _CONCURRENCY.value, _MAX_SECONDS.value))
    if _PROFILE.value:
      with urllib.request.urlopen(urllib.request.Request(url + "/debug/profile/stop", method="POST"),
                                  timeout=600) as r:
        print(f"{mode}:\n" + json.loads(r.read())["table"], flush=True)
  finally:
    proc.send_signal(signal.SIGTERM)  # drains, then exits
    try:
      proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
      proc.kill()
  done = [r for r in results if r["status"] == 200]
  ttft, tpot = [r["ttft"] for r in done], [r["tpot"] for r in done if r["tokens"] > 1]
  tokens = sum(r["tokens"] for r in done)
  return {"mode": mode, "requests": len(done), "failed": len(results) - len(done), "seconds": seconds,
          "requests_per_s": len(done) / seconds, "output_tokens_per_s": tokens / seconds, "output_tokens": tokens,
          "ttft_p50_s": _pct(ttft, 50), "ttft_p99_s": _pct(ttft, 99), "tpot_p50_s": _pct(tpot, 50),
          "tpot_p99_s": _pct(tpot, 99), "server_exit_code": proc.returncode}


def main(argv):
  del argv
  model_config = layout.load_config(_WORKDIR.value).model
  rows = []
  for mode in _MODES.value:
    rows.append(bench_mode(mode, model_config.vocab_size, model_config.max_len))
    print(json.dumps(rows[-1]), flush=True)
  print(f"\nserving {_WORKDIR.value} on {jax.devices()[0].device_kind} (server in its own process): "
        f"{_REQUESTS.value} requests, {_CONCURRENCY.value} clients, {_SLOTS.value} slots, "
        f"prompts {'-'.join(_PROMPT_LENGTHS.value)} tokens, "
        f"outputs {'-'.join(_OUTPUT_LENGTHS.value)} tokens")
  print("| mode | requests | req/s | output tok/s | TTFT p50 / p99 (s) | TPOT p50 / p99 (ms) |")
  print("|---|---|---|---|---|---|")
  for r in rows:
    tpot = f"{1e3 * r['tpot_p50_s']:.1f} / {1e3 * r['tpot_p99_s']:.1f}"
    print(f"| {r['mode']} | {r['requests']} | {r['requests_per_s']:.2f} | {r['output_tokens_per_s']:.1f} | "
          f"{r['ttft_p50_s']:.2f} / {r['ttft_p99_s']:.2f} | {tpot} |")
  by_mode = {r["mode"]: r for r in rows}
  result = {"device": jax.devices()[0].device_kind, "workdir": _WORKDIR.value, "slots": _SLOTS.value,
            "concurrency": _CONCURRENCY.value, "modes": rows}
  if {"continuous", "static"} <= set(by_mode):
    ratio = by_mode["continuous"]["output_tokens_per_s"] / by_mode["static"]["output_tokens_per_s"]
    result["continuous_over_static_throughput"] = ratio
    print(f"continuous / static output throughput: {ratio:.2f}x")
  with open(_OUT.value, "w", encoding="utf-8") as f:
    json.dump(result, f, indent=1)


if __name__ == "__main__":
  app.run(main)
