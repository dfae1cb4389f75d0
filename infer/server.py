"""OpenAI-compatible HTTP server (aiohttp) over a `Scheduler`: completions, streaming, models, health and metrics.

Routes:
  * `POST /v1/completions`: prompt (string, list of strings, token ids or list of token-id lists), max_tokens,
    temperature, top_p, top_k (an extension, as in vLLM), n, stop (string or up to 4 strings), seed, stream (server-sent
    events ending in `data: [DONE]`), stream_options.include_usage; `usage` counts tokens. String prompts start with
    `<|endoftext|>` as training documents do, and every completion stops at it unless `ignore_eos` (an extension,
    as in vLLM, for benchmarks) is true.
  * `POST /v1/chat/completions`: messages (system / user / assistant / developer turns, text content or text parts)
    rendered with the model's chat template (`train.sft.chat_template`: the tokenizer_config.json's, else
    `sft.DEFAULT_CHAT_TEMPLATE`) and a generation prompt; max_tokens or max_completion_tokens (default: the rest of
    the context), the same sampling fields, n, stop, seed and stream (`chat.completion.chunk` deltas, the role in
    each choice's first chunk); the assistant turn ends at the template's end-of-turn token.
  * `logprobs` on both (completions: the number of alternatives, 0-5; chat: `logprobs: true` and `top_logprobs`
    0-5): each generated token's log-probability under the model (before temperature and filtering) and its top
    alternatives, in OpenAI's shapes.
  * `GET /v1/models`, `GET /health` (503 while draining), `GET /metrics` (Prometheus text: queue length, active
    slots, free pages, tokens/s, time-to-first-token and time-per-output-token histograms).
Bad requests get 400 with an OpenAI-style error body (`{"error": {"message", "type", "param", "code"}}`): bodies that
are not JSON (bad charset, too deeply nested, numbers too large to parse), requests that can never fit (too many
prompts or completions for the queue, prompts longer than the context); a body over 4 MiB gets 413, a Content-Type
other than JSON 415, and with an API key (`Server(api_key=...)`) a missing or wrong `Authorization: Bearer` 401,
all as JSON. A full queue gets 429 with `Retry-After` and a draining server 503; a request that waits longer than
the scheduler's queue timeout 503 with `Retry-After`, one that runs past its request timeout 504, and an engine
failure 500 (in a stream: a last `error` event). A client that disconnects has its requests cancelled and their pages
freed. `BackgroundServer` runs the app on a loopback port in a thread (tests, benchmarks).
"""

from __future__ import annotations

import asyncio
import collections
import hmac
import json
import secrets
import threading
import time
import uuid

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import CONTENT_TYPE_LATEST

from infer.engine import TOP_LOGPROBS
from infer.sampling import SamplingParams
from train import profiling
from train import sft
from workdir import tokenizer as tokenizer_lib
from infer.scheduler import Draining, Event, QueueFull, Request, Scheduler

MAX_N = 16
MAX_STOP = 4
MAX_STOP_CHARS = 256  # per stop string
MAX_PROMPTS = 64  # prompts per request
MAX_BODY_BYTES = 4 * 2**20
RETRY_AFTER_S = 1
STUCK_AFTER_S = 60.0
# Accepted OpenAI fields that only have their neutral value here (anything else gets a 400 naming the field).
NEUTRAL = {"frequency_penalty": (0, 0.0, None), "presence_penalty": (0, 0.0, None),
           "echo": (False, None), "suffix": (None,), "logit_bias": (None,), "best_of": (None, 1)}
KNOWN = {"model", "prompt", "max_tokens", "temperature", "top_p", "top_k", "n", "stop", "stream", "stream_options",
         "seed", "user", "ignore_eos", "logprobs", *NEUTRAL}
CHAT_NEUTRAL = {"frequency_penalty": (0, 0.0, None), "presence_penalty": (0, 0.0, None), "logit_bias": (None,),
                "response_format": (None, {"type": "text"}), "parallel_tool_calls": (None,), "tools": (None, []),
                "tool_choice": (None, "none")}
CHAT_KNOWN = (KNOWN - {"prompt", "echo", "suffix", "best_of", *NEUTRAL}) | {"messages", "max_completion_tokens",
                                                                            "top_logprobs", *CHAT_NEUTRAL}
CHAT_ROLES = ("system", "developer", "user", "assistant")


class BadRequest(Exception):
  def __init__(self, message: str, param: str | None = None, code: str | None = None, status: int = 400):
    super().__init__(message)
    self.param, self.code, self.status = param, code, status


def error_response(status: int, message: str, *, type_: str = "invalid_request_error", param=None, code=None):
  body = {"error": {"message": message, "type": type_, "param": param, "code": code}}
  return web.json_response(body, status=status)


# finish reasons that fail a request -> (HTTP status, error type, code, message prefix); see scheduler.Event
FAILURES = {"error": (500, "server_error", "engine_error", "The engine failed while generating"),
            "queue_timeout": (503, "server_error", "queue_timeout", "The server is at capacity"),
            "timeout": (504, "server_error", "timeout", "The request timed out")}


def failure_response(request) -> web.Response:
  """The JSON error response of a request whose finish_reason is in FAILURES (503 carries Retry-After)."""
  status, type_, code, prefix = FAILURES[request.finish_reason]
  response = error_response(status, f"{prefix}: {request.error}", type_=type_, code=code)
  if status == 503:
    response.headers["Retry-After"] = str(RETRY_AFTER_S)
  return response


def _int(body, name, default, lo, hi):
  value = body.get(name, default)
  if value is None:
    value = default
  if isinstance(value, bool) or not isinstance(value, int):
    raise BadRequest(f"'{name}' must be an integer; got {value!r}", name)
  if not lo <= value <= hi:
    raise BadRequest(f"'{name}'={value} must be between {lo} and {hi}", name)
  return value


def _float(body, name, default, lo, hi, *, lo_open=False):
  value = body.get(name, default)
  if value is None:
    value = default
  if isinstance(value, bool) or not isinstance(value, (int, float)):
    raise BadRequest(f"'{name}' must be a number; got {value!r}", name)
  if not (lo < value if lo_open else lo <= value) or value > hi:
    raise BadRequest(f"'{name}'={value} must be in {'(' if lo_open else '['}{lo}, {hi}]", name)
  return float(value)


class Metrics:
  """Prometheus metrics in a registry of their own (no process-global state)."""

  def __init__(self, scheduler: Scheduler):
    self.registry = r = CollectorRegistry()
    engine = scheduler.engine
    Gauge("peakllm_queue_length", "Requests waiting for a slot.", registry=r).set_function(
        lambda: scheduler.queue_length)
    Gauge("peakllm_active_slots", "Slots running a request.", registry=r).set_function(lambda: engine.active_slots)
    Gauge("peakllm_free_pages", "Free KV-cache pages.", registry=r).set_function(lambda: engine.free_pages)
    Gauge("peakllm_cached_pages", "KV-cache pages holding a cached prompt prefix.",
          registry=r).set_function(lambda: engine.cached_pages)
    Gauge("peakllm_prefix_cache_hit_rate", "Share of admitted prompt tokens read from cached prefix pages.",
          registry=r).set_function(lambda: engine.prefix_hit_rate)
    Gauge("peakllm_used_pages", "KV-cache pages held by running requests (the pool's occupancy).",
          registry=r).set_function(lambda: engine.used_pages)
    Gauge("peakllm_preemptions", "Requests preempted for KV pages so far (recomputed when re-admitted).",
          registry=r).set_function(lambda: engine.preemptions)
    Gauge("peakllm_speculative_acceptance_rate", "Share of verified draft tokens kept (speculative decoding).",
          registry=r).set_function(lambda: engine.acceptance_rate)
    self._window: collections.deque[tuple[float, int]] = collections.deque()
    Gauge("peakllm_tokens_per_second", "Output tokens per second over the last 10 s.", registry=r).set_function(
        lambda: self._rate(scheduler.generated_tokens))
    self.tokens = Counter("peakllm_generated_tokens", "Output tokens generated.", registry=r)
    self.requests = Counter("peakllm_requests", "Finished requests by finish reason.", ["finish_reason"], registry=r)
    self.rejected = Counter("peakllm_rejected_requests", "Requests refused by status code.", ["status"], registry=r)
    buckets = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
    self.ttft = Histogram("peakllm_time_to_first_token_seconds", "Arrival to first token.", buckets=buckets,
                          registry=r)
    self.tpot = Histogram("peakllm_time_per_output_token_seconds", "Mean gap between output tokens after the first.",
                          buckets=buckets, registry=r)

  def _rate(self, total: int) -> float:
    now = time.monotonic()
    self._window.append((now, total))
    while len(self._window) > 1 and now - self._window[0][0] > 10:
      self._window.popleft()
    t0, n0 = self._window[0]
    return (total - n0) / (now - t0) if now > t0 else 0.0

  def on_finish(self, request: Request) -> None:
    self.requests.labels(request.finish_reason).inc()
    self.tokens.inc(len(request.output_ids))
    if request.ttft is not None:
      self.ttft.observe(request.ttft)
    if request.tpot is not None:
      self.tpot.observe(request.tpot)


class Server:
  """The aiohttp application over a scheduler. tokenizer: a `tokenizers.Tokenizer` (see `workdir.tokenizer`)."""

  def __init__(self, scheduler: Scheduler, tokenizer, model_id: str, metrics: Metrics, api_key: str | None = None,
               profile_dir: str | None = None, adapter_ids: tuple[str, ...] = (), chat_template=None):
    self.scheduler, self.tokenizer, self.model_id, self.metrics = scheduler, tokenizer, model_id, metrics
    # model ids the `model` field may name: the base, then the engine's LoRA adapters in bank order (1, 2, ...)
    self.model_ids = (model_id, *adapter_ids)
    self.profile_dir = profile_dir  # enables POST /debug/profile/start and /stop (a jax.profiler trace there)
    self._recording = profiling.Recording()
    self.api_key = api_key or None  # "" means no key
    self.stuck_after_s = STUCK_AFTER_S  # /health says "stuck" when work waits this long without an iteration
    self.eot = tokenizer_lib.eot_id(tokenizer)
    self.vocab = tokenizer.get_vocab_size()
    self.created = int(time.time())
    self.draining = False
    self.chat_template = chat_template or sft.chat_template("", tokenizer)  # the model's, or the documented default

  def app(self) -> web.Application:
    app = web.Application(client_max_size=MAX_BODY_BYTES, middlewares=[self._authorize])
    app.add_routes([web.post("/v1/completions", self.completions), web.post("/v1/chat/completions", self.chat),
                    web.get("/v1/models", self.models),
                    web.get("/health", self.health), web.get("/metrics", self.metrics_text)])
    if self.profile_dir:
      app.add_routes([web.post("/debug/profile/start", self.profile_start),
                      web.post("/debug/profile/stop", self.profile_stop)])
    return app

  # -- profiling (only with profile_dir) ---------------------------------------------------------------------------

  async def profile_start(self, request):
    if self._recording.active:
      return error_response(409, "a trace is already running; POST /debug/profile/stop first")
    self._recording.start(self.profile_dir)
    return web.json_response({"status": "tracing", "trace_dir": self.profile_dir})

  async def profile_stop(self, request):
    if not self._recording.active:
      return error_response(409, "no trace is running; POST /debug/profile/start first")
    summary = await asyncio.get_running_loop().run_in_executor(None, self._recording.stop)
    return web.json_response({"trace_dir": summary.trace_dir, "wall_s": summary.wall_s, "busy_s": summary.busy_s,
                              "table": summary.table(),
                              "top_ms": {op.name: op.seconds * 1e3 for op in summary.ops[:15]}})

  @web.middleware
  async def _authorize(self, request: web.Request, handler):
    """With an API key, /v1/* needs `Authorization: Bearer <key>` (401 otherwise); /health and /metrics stay open."""
    if self.api_key and request.path.startswith("/v1/"):
      given = request.headers.get("Authorization", "")
      scheme, _, token = given.partition(" ")
      if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.api_key.encode()):
        return error_response(401, "Incorrect or missing API key: send 'Authorization: Bearer <key>'",
                              code="invalid_api_key")
    return await handler(request)

  # -- simple routes ----------------------------------------------------------------------------------------------

  async def models(self, request):
    return web.json_response({"object": "list", "data": [
        {"id": m, "object": "model", "created": self.created, "owned_by": "peakllm",
         **({"parent": self.model_id} if m != self.model_id else {})} for m in self.model_ids]})

  async def health(self, request):
    if self.scheduler.error is not None:
      return web.json_response({"status": "failed", "error": str(self.scheduler.error)}, status=503)
    if self.draining:
      return web.json_response({"status": "draining"}, status=503)
    waited = self.scheduler.seconds_without_progress
    if waited > self.stuck_after_s:
      return web.json_response({"status": "stuck", "seconds_without_progress": round(waited, 1),
                                "in_flight": self.scheduler.in_flight}, status=503)
    return web.json_response({"status": "ok"})

  async def metrics_text(self, request):
    return web.Response(body=generate_latest(self.metrics.registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

  # -- completions ------------------------------------------------------------------------------------------------

  def _prompts(self, prompt) -> list[list[int]]:
    def ids(p):
      if isinstance(p, str):
        return tokenizer_lib.encode_document(self.tokenizer, p)
      if isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool) for t in p):
        bad = [t for t in p if not 0 <= t < self.vocab]
        if bad:
          raise BadRequest(f"token ids {bad[:5]} are outside the vocabulary [0, {self.vocab})", "prompt")
        return list(p)
      raise BadRequest("'prompt' must be a string, a list of strings, a non-empty list of token ids or a list of "
                       "such lists", "prompt")

    if isinstance(prompt, list) and prompt and all(isinstance(p, (str, list)) for p in prompt):
      return [ids(p) for p in prompt]
    return [ids(prompt)]

  def _chat_prompt(self, messages) -> list[int]:
    """The token ids of `messages` rendered by the chat template with the generation prompt, or BadRequest."""
    if not isinstance(messages, list) or not messages:
      raise BadRequest("'messages' must be a non-empty list of {'role', 'content'} objects", "messages")
    turns = []
    for i, m in enumerate(messages):
      content = m.get("content") if isinstance(m, dict) else None
      if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" and
                                           isinstance(p.get("text"), str) for p in content):
        content = "".join(p["text"] for p in content)  # text parts; images and audio are not supported
      if not isinstance(m, dict) or m.get("role") not in CHAT_ROLES or not isinstance(content, str):
        raise BadRequest(f"messages[{i}] must be {{'role': one of {', '.join(CHAT_ROLES)}, 'content': a string or "
                         "text parts}", "messages")
      turns.append({"role": "system" if m["role"] == "developer" else m["role"], "content": content})
    try:
      text = self.chat_template.render(turns, add_generation_prompt=True)
    except Exception as e:  # the template's raise_exception (e.g. roles out of order) and other template errors
      raise BadRequest(f"the model's chat template refused the messages: {e}", "messages") from None
    return tokenizer_lib.encode(self.tokenizer, text)

  def parse(self, body) -> tuple[list[list[int]], SamplingParams, int, bool, bool]:
    """Validated (prompts, params, n, stream, include_usage) of a completions body, or BadRequest."""
    return self._parse(body, chat=False)

  def parse_chat(self, body) -> tuple[list[list[int]], SamplingParams, int, bool, bool]:
    """Validated (prompts (one), params, n, stream, include_usage) of a chat completions body, or BadRequest."""
    return self._parse(body, chat=True)

  def _parse(self, body, chat: bool):
    if not isinstance(body, dict):
      raise BadRequest("the request body must be a JSON object")
    unknown = sorted(set(body) - (CHAT_KNOWN if chat else KNOWN))
    if unknown:
      raise BadRequest(f"Unrecognized request argument supplied: {', '.join(unknown)}", unknown[0])
    for name, allowed in (CHAT_NEUTRAL if chat else NEUTRAL).items():
      if name in body and body[name] not in allowed and not (name == "logit_bias" and body[name] == {}):
        raise BadRequest(f"'{name}'={body[name]!r} is not supported by this server (allowed: {allowed})", name)
    model = body.get("model", self.model_id)
    if model not in self.model_ids:
      raise BadRequest(f"The model '{model}' does not exist; this server serves {', '.join(map(repr, self.model_ids))}",
                       "model", "model_not_found", status=404)
    n = _int(body, "n", 1, 1, MAX_N)
    if chat:
      if "messages" not in body:
        raise BadRequest("'messages' is required", "messages")
      prompts = [self._chat_prompt(body["messages"])]
      if "max_completion_tokens" in body and "max_tokens" in body:
        raise BadRequest("give one of 'max_tokens' and 'max_completion_tokens'", "max_completion_tokens")
      limit = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
      rest = self.scheduler.engine.max_len - len(prompts[0])
      max_tokens = _int(body, limit, max(rest, 1), 1, self.scheduler.engine.max_len)
    else:
      if "prompt" not in body:
        raise BadRequest("'prompt' is required", "prompt")
      if isinstance(body["prompt"], list) and len(body["prompt"]) > MAX_PROMPTS and all(
          isinstance(p, (str, list)) for p in body["prompt"]):
        raise BadRequest(f"{len(body['prompt'])} prompts in one request; the limit is {MAX_PROMPTS}", "prompt")
      prompts = self._prompts(body["prompt"])
      max_tokens = _int(body, "max_tokens", 16, 1, self.scheduler.engine.max_len)
    if len(prompts) * n > self.scheduler.max_queue:
      raise BadRequest(f"{len(prompts)} prompt(s) x n={n} completions can never be queued at once here (the queue "
                       f"holds {self.scheduler.max_queue}); send fewer per request", "n")
    if body.get("best_of") not in (None, 1, n):
      raise BadRequest("'best_of' must equal n", "best_of")
    stop = body.get("stop")
    if isinstance(stop, str):
      stop = [stop]
    if stop is None:
      stop = []
    if not isinstance(stop, list) or len(stop) > MAX_STOP or not all(
        isinstance(s, str) and 0 < len(s) <= MAX_STOP_CHARS for s in stop):
      raise BadRequest(f"'stop' must be a non-empty string of at most {MAX_STOP_CHARS} characters or a list of at "
                       f"most {MAX_STOP} of them", "stop")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
      raise BadRequest(f"'stream' must be a boolean; got {stream!r}", "stream")
    ignore_eos = body.get("ignore_eos", False)
    if not isinstance(ignore_eos, bool):
      raise BadRequest(f"'ignore_eos' must be a boolean; got {ignore_eos!r}", "ignore_eos")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict) or set(options) - {"include_usage"}:
      raise BadRequest("'stream_options' may only hold 'include_usage'", "stream_options")
    if chat:  # logprobs: bool, top_logprobs: alternatives
      if body.get("logprobs") not in (None, True, False):
        raise BadRequest(f"'logprobs' must be a boolean; got {body['logprobs']!r}", "logprobs")
      top = _int(body, "top_logprobs", 0, 0, TOP_LOGPROBS)
      if top and not body.get("logprobs"):
        raise BadRequest("'top_logprobs' needs 'logprobs': true", "top_logprobs")
      logprobs = top if body.get("logprobs") else -1
    else:  # logprobs: the number of alternatives, or null
      logprobs = -1 if body.get("logprobs") is None else _int(body, "logprobs", 0, 0, TOP_LOGPROBS)
    params = SamplingParams(
        max_tokens=max_tokens, logprobs=logprobs,
        temperature=_float(body, "temperature", 1.0, 0.0, 2.0), top_p=_float(body, "top_p", 1.0, 0.0, 1.0,
                                                                              lo_open=True),
        top_k=_int(body, "top_k", 0, 0, self.vocab),
        seed=_int(body, "seed", None, 0, 2**31 - 1) if body.get("seed") is not None else secrets.randbelow(2**31),
        stop_tokens=() if ignore_eos else (self.eot,), stop_strings=tuple(stop),
        adapter=self.model_ids.index(model))
    for p in prompts:
      try:
        self.scheduler.engine.check_fits(p, params)
      except ValueError as e:
        raise BadRequest(str(e), "prompt", "context_length_exceeded") from None
    return prompts, params, n, stream, bool(options.get("include_usage", False))

  def _logprobs(self, token_ids, logprobs, top: int, chat: bool):
    """OpenAI's logprobs object for these tokens (None when not asked for): completions {tokens, token_logprobs,
    top_logprobs, text_offset}, chat {content: [{token, logprob, bytes, top_logprobs}]}."""
    if top < 0:
      return None
    piece = lambda i: tokenizer_lib.decode(self.tokenizer, [i])  # noqa: E731
    pairs = [(t, lp) for t, lp in zip(token_ids, logprobs) if lp is not None]
    if chat:
      entry = lambda i, lp: {"token": piece(i), "logprob": lp, "bytes": list(piece(i).encode())}  # noqa: E731
      return {"content": [{**entry(t, lp[0]), "top_logprobs": [entry(j, v) for j, v in lp[1][:top]]}
                          for t, lp in pairs]}
    offsets, at = [], 0
    for t, _ in pairs:
      offsets.append(at)
      at += len(piece(t))
    return {"tokens": [piece(t) for t, _ in pairs], "token_logprobs": [lp[0] for _, lp in pairs],
            "top_logprobs": [{piece(j): v for j, v in lp[1][:top]} for _, lp in pairs], "text_offset": offsets}

  def _submit_all(self, prompts, params, n, loop) -> tuple[list[Request], list[asyncio.Queue]]:
    requests, queues = [], []
    try:
      for p in prompts:
        for j in range(n):
          queue: asyncio.Queue[Event] = asyncio.Queue()
          forward = lambda event, q=queue: loop.call_soon_threadsafe(q.put_nowait, event)  # noqa: E731
          seeded = SamplingParams(**{**params.__dict__, "seed": (params.seed + j) % 2**31})
          requests.append(self.scheduler.submit(p, seeded, forward))
          queues.append(queue)
    except (QueueFull, Draining):
      for r in requests:
        r.cancel()
      raise
    return requests, queues

  async def completions(self, request: web.Request):
    return await self._complete(request, chat=False)

  async def chat(self, request: web.Request):
    return await self._complete(request, chat=True)

  async def _complete(self, request: web.Request, chat: bool):
    if self.draining:
      self.metrics.rejected.labels("503").inc()
      return error_response(503, "The server is shutting down", type_="server_error", code="draining")
    content_type = request.headers.get("Content-Type", "application/json").split(";")[0].strip().lower()
    if content_type not in ("application/json", ""):
      return error_response(415, f"Content-Type {content_type!r} is not supported: send 'application/json'")
    try:
      body = json.loads(await request.read())
    except web.HTTPRequestEntityTooLarge:
      return error_response(413, f"The request body is larger than {MAX_BODY_BYTES} bytes",
                            code="request_too_large")
    except (ValueError, UnicodeDecodeError, RecursionError):  # not JSON, not UTF-8, a number too long, too deep
      return error_response(400, "The request body is not valid JSON (UTF-8, reasonably nested, numbers of at most "
                            "4,300 digits)")
    loop = asyncio.get_running_loop()
    try:  # tokenizing long prompts off the event loop keeps /health and streams responsive
      prompts, params, n, stream, include_usage = await loop.run_in_executor(
          None, self.parse_chat if chat else self.parse, body)
    except BadRequest as e:
      return error_response(e.status, str(e), param=e.param, code=e.code)
    try:
      requests, queues = self._submit_all(prompts, params, n, loop)
    except QueueFull as e:
      self.metrics.rejected.labels("429").inc()
      response = error_response(429, f"The server is at capacity: {e}; retry later", type_="rate_limit_exceeded")
      response.headers["Retry-After"] = str(RETRY_AFTER_S)
      return response
    except Draining as e:
      self.metrics.rejected.labels("503").inc()
      return error_response(503, f"Service unavailable: {e}", type_="server_error", code="unavailable")
    head = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}",
            "object": ("chat.completion.chunk" if stream else "chat.completion") if chat else "text_completion",
            "created": int(time.time()), "model": self.model_ids[params.adapter]}
    usage = lambda: {"prompt_tokens": sum(len(r.prompt) for r in requests),  # noqa: E731
                     "completion_tokens": sum(len(r.output_ids) for r in requests),
                     "total_tokens": sum(len(r.prompt) + len(r.output_ids) for r in requests)}
    try:
      if not stream:
        for queue in queues:
          while (await queue.get()).finish_reason is None:
            pass
        failed = [r for r in requests if r.finish_reason in FAILURES]
        if failed:
          return failure_response(failed[0])
        choices = [{"index": i, **({"message": {"role": "assistant", "content": r.text}} if chat else
                                   {"text": r.text}),
                    "logprobs": self._logprobs(r.output_ids, r.output_logprobs, params.logprobs, chat),
                    "finish_reason": r.finish_reason}
                   for i, r in enumerate(requests)]
        return web.json_response({**head, "choices": choices, "usage": usage()})
      response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
      await response.prepare(request)
      send = lambda data: response.write(f"data: {json.dumps(data)}\n\n".encode())  # noqa: E731
      pending = {asyncio.ensure_future(q.get()): i for i, q in enumerate(queues)}
      started: set[int] = set()  # chat: choices whose first chunk (with the role) went out
      while pending:
        done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
        for task in done:
          i = pending.pop(task)
          event = task.result()
          if event.finish_reason in FAILURES:  # the status line went out already: the error is the last event
            await send(json.loads(failure_response(requests[i]).body))
            continue
          if event.text or event.finish_reason:
            if chat:
              delta = {"content": event.text} if event.text else {}
              if i not in started:
                delta = {"role": "assistant", "content": event.text}
                started.add(i)
            logprobs = self._logprobs(event.token_ids, event.logprobs, params.logprobs, chat)
            if chat:
              choice = {"index": i, "delta": delta, "logprobs": logprobs, "finish_reason": event.finish_reason}
            else:
              choice = {"text": event.text, "index": i, "logprobs": logprobs, "finish_reason": event.finish_reason}
            await send({**head, "choices": [choice]})
          if event.finish_reason is None:
            pending[asyncio.ensure_future(queues[i].get())] = i
      if include_usage:
        await send({**head, "choices": [], "usage": usage()})
      await response.write(b"data: [DONE]\n\n")
      await response.write_eof()
      return response
    finally:  # a client that went away (handler cancelled or write failed): free its slots and pages
      for r in requests:
        if r.finish_reason is None:
          r.cancel()


class BackgroundServer:
  """Runs a `Server` on 127.0.0.1 in a thread with its own event loop. `url` is the base URL once started."""

  def __init__(self, server: Server, port: int = 0):
    self.server, self.port = server, port
    self._loop = asyncio.new_event_loop()
    self._runner: web.AppRunner | None = None
    self._thread = threading.Thread(target=self._loop.run_forever, name="http", daemon=True)
    self.url = ""

  def __enter__(self) -> "BackgroundServer":
    self._thread.start()
    asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(timeout=60)
    return self

  async def _start(self):
    self._runner = web.AppRunner(self.server.app(), handler_cancellation=True)
    await self._runner.setup()
    site = web.TCPSite(self._runner, "127.0.0.1", self.port, backlog=1024)
    await site.start()
    self.port = self._runner.addresses[0][1]
    self.url = f"http://127.0.0.1:{self.port}"

  def __exit__(self, *exc) -> None:
    asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(timeout=60)
    self._loop.call_soon_threadsafe(self._loop.stop)
    self._thread.join(timeout=10)
