"""The serving load generator shared by `scripts.bench_serve` and `scripts.ablate --study=serve`: starts
`python -m infer.serve` in its own process with given settings, warms it up (prefill buckets, decode step), sends a
seeded mix of streaming requests from closed-loop clients, and returns throughput, TTFT/TPOT percentiles and the
server's peak RSS.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

import aiohttp


@dataclasses.dataclass(frozen=True)
class Settings:
  """One serving benchmark: the server's settings and the load (`scripts.bench_serve` fills it from its flags;
  `scripts.ablate --study=serve` varies slots, mode and prefill_chunk)."""
  workdir: str
  mode: str = "continuous"
  slots: int = 8
  page_size: int = 16
  prefill_chunk: int = 0
  requests: int = 48
  concurrency: int = 16
  max_seconds: float = 300.0
  prompt_lengths: tuple[int, int] = (8, 96)
  output_lengths: tuple[int, int] = (8, 128)
  attention_impl: str | None = None
  matmul_impl: str | None = None  # the server's --matmul_impl (auto: native CPU kernels where built, xla: none)
  seed: int = 0
  profile: str = ""
  prefix_caching: bool = False
  shared_prefix: int = 0  # tokens of one common "system prompt" that starts every request's prompt
  num_pages: int = 0  # the engine's KV pool (0: enough for every slot at full context)
  page_allocation: str = "on_demand"  # the engine's KV pages: on_demand (preempting) or reserve
  mixed_batches: bool = True  # prefill chunks ride in the decode step's call (else a call each before it)
  declared_max_tokens: int = 0  # > 0: every request asks for this many tokens, and its client disconnects after its
  # own output length (as requests that end early on a stop string or EOS): the server cannot know lengths in advance
  burst: int = 0  # > 0: open-loop arrivals, this many requests at once every `burst_interval` s (not closed-loop)
  burst_interval: float = 1.0
  speculate: str = "none"  # the engine's speculative decoding: none, lookup or draft
  draft_tokens: int = 4
  draft_workdir: str = ""


def request_mix(n: int, vocab: int, max_len: int, seed: int, prompt_lengths: tuple[int, int],
                output_lengths: tuple[int, int], shared_prefix: int = 0, declared_max_tokens: int = 0) -> list[dict]:
  """n requests of random token ids: prompt lengths (after a common `shared_prefix`-token start) and output lengths
  drawn uniformly from the ranges, outputs cut to the context. With `declared_max_tokens` each asks for that many
  (cut to the context) and carries its own length as "stop_after" (the client disconnects there)."""
  rng = random.Random(seed)
  (p_lo, p_hi), (o_lo, o_hi) = prompt_lengths, output_lengths
  prefix = [rng.randrange(1, vocab) for _ in range(shared_prefix)]
  mix = []
  for _ in range(n):
    prompt_len = shared_prefix + rng.randint(p_lo, p_hi)
    out_len = min(rng.randint(o_lo, o_hi), max_len - prompt_len)
    prompt = prefix + [rng.randrange(1, vocab) for _ in range(prompt_len - shared_prefix)]
    body = {"prompt": prompt, "max_tokens": out_len,
            "temperature": 0, "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    if declared_max_tokens:
      body.update(max_tokens=max(out_len, min(declared_max_tokens, max_len - prompt_len)), stop_after=out_len)
    mix.append(body)
  return mix


async def _one(session: aiohttp.ClientSession, url: str, body: dict) -> dict:
  """One streamed request; a body's "stop_after" (not sent) ends it there by disconnecting."""
  body = dict(body)
  stop_after = body.pop("stop_after", 0)
  start = time.perf_counter()
  first = last = None
  tokens, gaps = 0, []  # gaps: seconds between consecutive token events (inter-token latency)
  async with session.post(url + "/v1/completions", json=body) as response:
    if response.status != 200:
      return {"status": response.status}
    async for line in response.content:
      line = line.strip()
      if not line.startswith(b"data: ") or line == b"data: [DONE]":
        continue
      event = json.loads(line[6:])
      if event["choices"]:
        now = time.perf_counter()
        first = first or now
        if last is not None:
          gaps.append(now - last)
        last = now
        tokens += 1  # one event per token (no stop strings here)
      if event.get("usage"):
        tokens = event["usage"]["completion_tokens"]
      if stop_after and tokens >= stop_after:
        break  # leaving the block closes the connection: the server cancels the request
  end = time.perf_counter()
  return {"status": 200, "ttft": first - start, "tpot": (end - first) / max(tokens - 1, 1), "tokens": tokens,
          "latency": end - start, "itl": gaps}


POLLED = ("peakllm_active_slots", "peakllm_used_pages")  # sampled from /metrics while the load runs


async def _poll(session: aiohttp.ClientSession, url: str, done: asyncio.Event, samples: dict) -> None:
  """Samples the POLLED gauges every 50 ms until `done`."""
  while not done.is_set():
    async with session.get(url + "/metrics") as response:
      for line in (await response.text()).splitlines():
        name, _, value = line.partition(" ")
        if name in POLLED:
          samples.setdefault(name, []).append(float(value))
    try:
      await asyncio.wait_for(done.wait(), 0.05)
    except asyncio.TimeoutError:
      pass


async def run_load(url: str, mix: list[dict], concurrency: int, max_seconds: float, burst: int = 0,
                   burst_interval: float = 1.0, samples: dict | None = None) -> tuple[list[dict], float]:
  """Sends `mix`: closed-loop from `concurrency` clients, or with `burst` > 0 open-loop, `burst` requests at once
  every `burst_interval` seconds. `samples`: filled with the POLLED gauges over the load."""
  queue = list(reversed(mix))
  results: list[dict] = []
  start = time.perf_counter()

  async def client(session):
    while queue and time.perf_counter() - start < max_seconds:
      results.append(await _one(session, url, queue.pop()))

  async def bursts(session):
    tasks = []
    while queue and time.perf_counter() - start < max_seconds:
      tasks += [asyncio.create_task(_one(session, url, queue.pop())) for _ in range(min(burst, len(queue)))]
      await asyncio.sleep(burst_interval)
    results.extend(await asyncio.gather(*tasks))

  async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0),
                                   timeout=aiohttp.ClientTimeout(total=None)) as session:
    done = asyncio.Event()
    poller = asyncio.create_task(_poll(session, url, done, samples)) if samples is not None else None
    if burst:
      await bursts(session)
    else:
      await asyncio.gather(*(client(session) for _ in range(concurrency)))
    done.set()
    if poller is not None:
      await poller
  return results, time.perf_counter() - start


def _pct(values: list[float], q: float) -> float:
  return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


def _free_port() -> int:
  with socket.socket() as sock:
    sock.bind(("127.0.0.1", 0))
    return sock.getsockname()[1]


def _start_server(s: Settings, port: int) -> subprocess.Popen:
  """`python -m infer.serve` in its own process (as in production: the load generator does not share its GIL)."""
  cmd = [sys.executable, "-m", "infer.serve", f"--workdir={s.workdir}", f"--port={port}", f"--mode={s.mode}",
         f"--slots={s.slots}", f"--page_size={s.page_size}", f"--prefill_chunk={s.prefill_chunk}",
         f"--max_queue={max(64, s.concurrency)}"]
  if s.attention_impl:
    cmd.append(f"--attention_impl={s.attention_impl}")
  if s.matmul_impl:
    cmd.append(f"--matmul_impl={s.matmul_impl}")
  if s.prefix_caching:
    cmd.append("--prefix_caching")
  cmd += [f"--page_allocation={s.page_allocation}", f"--num_pages={s.num_pages}",
          f"--mixed_batches={str(s.mixed_batches).lower()}"]
  if s.speculate != "none":
    cmd += [f"--speculate={s.speculate}", f"--draft_tokens={s.draft_tokens}"]
    if s.draft_workdir:
      cmd.append(f"--draft_workdir={s.draft_workdir}")
  if s.profile:
    cmd.append(f"--profile_dir={os.path.abspath(os.path.join(s.profile, s.mode))}")
  # Its log goes to a file: a pipe nobody reads after start-up fills (64 KiB of access log) and blocks the server.
  log = tempfile.NamedTemporaryFile("w+", prefix="peakllm_serve_", suffix=".log", delete=False)
  proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, text=True)
  proc.log_path = log.name
  deadline = time.time() + 300
  while time.time() < deadline:
    if proc.poll() is not None:
      raise RuntimeError(f"the server exited with {proc.returncode} (log {log.name}):\n{_tail(log.name)}")
    try:
      with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
        if r.status == 200:
          return proc
    except OSError:
      time.sleep(0.5)
  proc.kill()
  raise RuntimeError("the server did not become healthy within 300 s")


def _tail(path: str, lines: int = 40) -> str:
  with open(path, encoding="utf-8", errors="replace") as f:
    return "".join(f.readlines()[-lines:])


def _gauge(url: str, name: str) -> float | None:
  """One gauge's value from the server's Prometheus /metrics (it includes warm-up requests), or None."""
  with urllib.request.urlopen(url + "/metrics", timeout=10) as r:
    for line in r.read().decode().splitlines():
      if line.startswith(name + " "):
        return float(line.split()[1])
  return None


def _peak_rss_mib(pid: int) -> float | None:
  """The process's peak resident memory (VmHWM) in MiB, from /proc (Linux), or None."""
  try:
    with open(f"/proc/{pid}/status", encoding="utf-8") as f:
      return next((int(line.split()[1]) / 1024 for line in f if line.startswith("VmHWM:")), None)
  except OSError:
    return None


def bench_mode(s: Settings, vocab: int, max_len: int) -> dict:
  """Starts the server with settings `s`, warms it up, runs the load, drains it; the figures as a dict."""
  port = _free_port()
  url = f"http://127.0.0.1:{port}"
  start = time.perf_counter()
  proc = _start_server(s, port)
  server_peak = acceptance = preemptions = None
  samples = {}
  try:
    warm = [{"prompt": [1] * n, "max_tokens": 2, "temperature": 0, "ignore_eos": True, "stream": True}
            for n in (8, 24, 48, 96, 160) if n + 2 <= max_len]
    if s.shared_prefix:  # the prefill shapes after a cached prefix too, with a prefix of its own (not the load's)
      other = [1 + (7 * i) % (vocab - 1) for i in range(s.shared_prefix)]
      warm += [{**warm[0], "prompt": other + [2 + i % (vocab - 2)] * n}
               for i, n in enumerate((s.prompt_lengths[0], s.prompt_lengths[0], s.prompt_lengths[1],
                                      (s.prompt_lengths[0] + s.prompt_lengths[1]) // 2))]
    asyncio.run(run_load(url, warm, 1, 600))  # compiles the prefill buckets and the decode step
    ready_s = time.perf_counter() - start
    mix = request_mix(s.requests, vocab, max_len, s.seed, s.prompt_lengths, s.output_lengths, s.shared_prefix,
                      s.declared_max_tokens)
    if s.profile:
      urllib.request.urlopen(urllib.request.Request(url + "/debug/profile/start", method="POST"), timeout=60)
    samples: dict = {}
    results, seconds = asyncio.run(run_load(url, mix, s.concurrency, s.max_seconds, s.burst, s.burst_interval,
                                            samples))
    if s.profile:
      with urllib.request.urlopen(urllib.request.Request(url + "/debug/profile/stop", method="POST"),
                                  timeout=600) as r:
        print(f"{s.mode}:\n" + json.loads(r.read())["table"], flush=True)
    server_peak = _peak_rss_mib(proc.pid)
    acceptance = _gauge(url, "peakllm_speculative_acceptance_rate")
    preemptions = _gauge(url, "peakllm_preemptions")
  finally:
    proc.send_signal(signal.SIGTERM)  # drains, then exits
    try:
      proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
      proc.kill()
    if proc.returncode == 0:
      os.remove(proc.log_path)
    else:
      print(f"the server exited with {proc.returncode}; its log: {proc.log_path}", flush=True)
  done = [r for r in results if r["status"] == 200]
  ttft, tpot = [r["ttft"] for r in done], [r["tpot"] for r in done if r["tokens"] > 1]
  itl = [gap for r in done for gap in r["itl"]]  # every gap between two tokens of a request
  tokens = sum(r["tokens"] for r in done)
  return {"mode": s.mode, "slots": s.slots, "prefill_chunk": s.prefill_chunk, "prefix_caching": s.prefix_caching,
          "shared_prefix": s.shared_prefix, "requests": len(done), "failed": len(results) - len(done), "seconds": seconds,
          "requests_per_s": len(done) / seconds, "output_tokens_per_s": tokens / seconds, "output_tokens": tokens,
          "ttft_p50_s": _pct(ttft, 50), "ttft_p99_s": _pct(ttft, 99), "tpot_p50_s": _pct(tpot, 50),
          "tpot_p99_s": _pct(tpot, 99), "itl_p50_s": _pct(itl, 50), "itl_p99_s": _pct(itl, 99),
          "server_exit_code": proc.returncode, "ready_s": ready_s,
          "server_peak_rss_mib": server_peak, "speculate": s.speculate, "draft_tokens": s.draft_tokens,
          "acceptance_rate": acceptance, "page_allocation": s.page_allocation, "burst": s.burst,
          "mixed_batches": s.mixed_batches, "matmul_impl": s.matmul_impl or "auto",
          "declared_max_tokens": s.declared_max_tokens,
          "preemptions": preemptions, **_occupancy(samples)}


def _occupancy(samples: dict) -> dict:
  """Mean and max of the polled running requests and used pages during the load."""
  out = {}
  for name, key in (("peakllm_active_slots", "running_requests"), ("peakllm_used_pages", "used_pages")):
    values = samples.get(name) or [float("nan")]
    out[f"{key}_mean"], out[f"{key}_max"] = statistics.fmean(values), max(values)
  return out
