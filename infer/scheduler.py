"""Iteration-level scheduling (Orca) over an `Engine`: requests join and leave the running batch at every step.

A `Scheduler` owns one engine and a background thread. Each iteration it
  1. ends cancelled requests (their pages go back at once),
  2. admits waiting requests in arrival order while a slot and the request's pages are free (`continuous` mode), or
     only when the batch has emptied (`static` mode: the classic fixed batch, for comparison),
  3. runs one prefill chunk for each slot still prefilling, then
  4. one decode step for all decoding slots, and hands each new token to its request; requests the engine preempted
     for pages (on-demand allocation) go back to the front of the queue and resume from their output so far.
With mixed batches (`Engine(mixed_batches=True)`) 3 and 4 are one engine call (`Engine.step`): the waiting prompts'
chunks, several at once within the prefill token budget, ride beside the decode tokens, so a burst of arrivals
lengthens each step by at most one budget's worth of prefill instead of stalling the decodes for every prompt.
The waiting queue is bounded: `submit` raises `QueueFull` instead of growing without bound, and `Draining` once
`drain()` was called. Requests report through their `on_event` callback (called on the scheduler thread), so the
HTTP server can forward them to its event loop.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import logging
import threading
import time
from collections.abc import Callable, Sequence

from infer.engine import Engine

log = logging.getLogger("peakllm.scheduler")
MAX_CONSECUTIVE_FAILURES = 3  # then the scheduler stops and /health reports it failed
from infer.sampling import SamplingParams


class QueueFull(Exception):
  """The waiting queue is at its bound (HTTP 429)."""


class Draining(Exception):
  """The scheduler is draining and takes no new requests (HTTP 503)."""


@dataclasses.dataclass
class Event:
  """What a request produced since its last event: new token ids, the text they complete (held back while it may
  be the start of a stop string), and, on the last event, finish_reason: "stop", "length" or "cancelled"."""

  token_ids: list[int]
  text: str
  # "stop", "length", "cancelled", "error" (the engine failed: HTTP 500), "queue_timeout" (waited longer than the
  # scheduler's queue_timeout for a slot: HTTP 503) or "timeout" (ran longer than its request_timeout: HTTP 504)
  finish_reason: str | None = None
  logprobs: list = dataclasses.field(default_factory=list)  # per token id: `engine.Logprob` (or None)


@dataclasses.dataclass(eq=False)
class Request:
  prompt: Sequence[int]
  params: SamplingParams
  on_event: Callable[[Event], None]
  id: int = -1
  arrival: float = dataclasses.field(default_factory=time.perf_counter)
  first_token_time: float | None = None
  finish_time: float | None = None
  finish_reason: str | None = None
  output_ids: list[int] = dataclasses.field(default_factory=list)
  output_logprobs: list = dataclasses.field(default_factory=list)  # per output id: `engine.Logprob`
  text: str = ""  # the completion text emitted so far
  cancelled: threading.Event = dataclasses.field(default_factory=threading.Event)
  error: str | None = None  # why the request failed (finish_reason "error", "queue_timeout" or "timeout")

  def cancel(self) -> None:
    """Asks the scheduler to end this request (e.g. its client went away); its pages are freed next iteration."""
    self.cancelled.set()

  @property
  def ttft(self) -> float | None:
    return None if self.first_token_time is None else self.first_token_time - self.arrival

  @property
  def tpot(self) -> float | None:
    """Mean time per output token after the first."""
    if self.finish_time is None or self.first_token_time is None or len(self.output_ids) < 2:
      return None
    return (self.finish_time - self.first_token_time) / (len(self.output_ids) - 1)


def _held_back(text: str, stops: Sequence[str]) -> int:
  """How many trailing characters of `text` could still grow into one of `stops` (so must not be emitted yet)."""
  hold = 0
  for stop in stops:
    for n in range(min(len(stop) - 1, len(text)), hold, -1):
      if text.endswith(stop[:n]):
        hold = n
        break
  return hold


def _end_reason(request: Request, now: float, limit: float, late: str, doing: str) -> str | None:
  """"cancelled"; `late` once more than `limit` seconds (0: no limit) have passed since the request arrived, with
  request.error saying so (`doing` formatted with the seconds); or None to keep the request."""
  if request.cancelled.is_set():
    return "cancelled"
  elapsed = now - request.arrival
  if limit and elapsed > limit:
    request.error = f"{doing.format(elapsed)} (the server's {late.replace('_', ' ')} is {limit:g} s)"
    return late
  return None


class Scheduler:
  """Runs an `Engine` on a background thread (see the module docstring).

  detokenize: token ids -> text (for stop strings and the text in events). mode: "continuous" or "static".
  max_queue: the bound on waiting requests. queue_timeout: seconds a request may wait for a slot before it ends with
  "queue_timeout"; request_timeout: seconds from arrival to the last token before it ends with "timeout" (its slot
  and pages are freed); 0 disables either. on_finish: called with each finished request (metrics)."""

  def __init__(self, engine: Engine, detokenize: Callable[[Sequence[int]], str], *, mode: str = "continuous",
               max_queue: int = 64, queue_timeout: float = 0.0, request_timeout: float = 0.0,
               on_finish: Callable[[Request], None] | None = None):
    if mode not in ("continuous", "static"):
      raise ValueError(f"mode={mode!r} must be 'continuous' or 'static'")
    if max_queue < 1:
      raise ValueError(f"max_queue={max_queue} must be >= 1")
    for name, value in (("queue_timeout", queue_timeout), ("request_timeout", request_timeout)):
      if not value >= 0:
        raise ValueError(f"{name}={value} must be >= 0 seconds (0: no limit)")
    self.engine, self.mode, self.max_queue = engine, mode, max_queue
    self.queue_timeout, self.request_timeout = queue_timeout, request_timeout
    self._detokenize = detokenize
    self.on_finish = on_finish  # may be set after construction (the server's metrics)
    self._waiting: collections.deque[Request] = collections.deque()
    self._running: dict[int, Request] = {}  # slot -> request
    self._lock = threading.Condition()
    self._ids = itertools.count()
    self._draining = False
    self._stop = False
    self._thread: threading.Thread | None = None
    self.error: BaseException | None = None
    self.generated_tokens = 0
    self._progress = time.monotonic()  # when the last iteration finished (or the loop was last idle)

  # -- client side ------------------------------------------------------------------------------------------------

  def submit(self, prompt: Sequence[int], params: SamplingParams, on_event: Callable[[Event], None]) -> Request:
    """Queues a request. ValueError for a request that can never run here; QueueFull; Draining."""
    params.validate()
    self.engine.check_fits(prompt, params)
    with self._lock:
      if self.error is not None:
        raise Draining(f"the engine failed ({type(self.error).__name__}: {self.error}); restart the server")
      if self._draining or self._stop:
        raise Draining("the server is shutting down")
      if len(self._waiting) >= self.max_queue:
        raise QueueFull(f"{len(self._waiting)} requests are waiting (the bound is {self.max_queue})")
      request = Request(list(prompt), params, on_event, id=next(self._ids))
      self._waiting.append(request)
      self._lock.notify()
    return request

  @property
  def queue_length(self) -> int:
    return len(self._waiting)

  @property
  def in_flight(self) -> int:
    return len(self._waiting) + len(self._running)

  @property
  def seconds_without_progress(self) -> float:
    """How long work has been in flight without an iteration finishing (0 when idle): a stuck engine grows it."""
    return time.monotonic() - self._progress if self.in_flight else 0.0

  def start(self) -> "Scheduler":
    self._thread = threading.Thread(target=self._loop, name="scheduler", daemon=True)
    self._thread.start()
    return self

  def drain(self, timeout: float | None = None) -> bool:
    """Stops taking requests and waits until those in flight have finished. True if they all did."""
    deadline = None if timeout is None else time.monotonic() + timeout
    with self._lock:
      self._draining = True
      while self._waiting or self._running:
        if self.error is not None:
          return False
        left = None if deadline is None else deadline - time.monotonic()
        if left is not None and left <= 0:
          return False
        self._lock.wait(0.05 if left is None else min(left, 0.05))
    return True

  def stop(self) -> None:
    with self._lock:
      self._stop = True
      self._lock.notify()
    if self._thread is not None:
      self._thread.join()

  # -- the loop ---------------------------------------------------------------------------------------------------

  def _loop(self) -> None:
    failures = 0  # consecutive failed iterations
    try:
      while True:
        with self._lock:
          while not self._stop and not self._waiting and not self._running:
            self._progress = time.monotonic()
            self._lock.wait()
          if self._stop:
            break
          self._end_cancelled_or_late()
          self._admit()
        try:
          self.step()
          failures = 0
        except Exception as e:  # noqa: BLE001  the running requests fail, the engine starts afresh, waiting ones go on
          failures += 1
          if failures >= MAX_CONSECUTIVE_FAILURES:
            raise
          log.exception("engine step failed (%d in a row); failing %d running request(s) and resetting the engine",
                        failures, len(self._running))
          self._fail_running(e)
        self._progress = time.monotonic()
        with self._lock:
          self._lock.notify_all()
    except BaseException as e:  # noqa: BLE001  (reported to every waiter, then re-raised on this thread)
      self.error = e
      with self._lock:
        for request in list(self._waiting) + list(self._running.values()):
          self._finish_event(request, [], "", "cancelled")
        self._waiting.clear()
        self._running.clear()
        self._lock.notify_all()
      raise

  def _fail_running(self, error: Exception) -> None:
    with self._lock:
      failed = list(self._running.values())
      self._running.clear()
      self.engine.reset()
    for request in failed:
      request.error = f"{type(error).__name__}: {error}"
      self._finish_event(request, [], "", "error")

  def _end_cancelled_or_late(self) -> None:
    now = time.perf_counter()
    for request in list(self._waiting):
      reason = _end_reason(request, now, self.queue_timeout, "queue_timeout", "waited {:.1f} s for a free slot")
      if reason:
        self._waiting.remove(request)
        self._finish_event(request, [], "", reason)
    for slot, request in list(self._running.items()):
      reason = _end_reason(request, now, self.request_timeout, "timeout",
                           f"ran {{:.1f}} s and produced {len(request.output_ids)} tokens")
      if reason:
        self.engine.release(slot)
        del self._running[slot]
        self._finish_event(request, [], "", reason)

  def _admit(self) -> None:
    if self.mode == "static" and self._running:
      return
    while self._waiting:
      request = self._waiting[0]
      slot = self.engine.insert(request.prompt, request.params, resume=request.output_ids)
      if slot is None:
        return
      self._waiting.popleft()
      self._running[slot] = request

  def step(self) -> None:
    """One iteration: with mixed batches one engine call (prefill chunks beside every decoding slot's token), else a
    prefill chunk for each prefilling slot, one call each, then one decode step for all decoding slots."""
    if self.engine.mixed_batches:
      produced = self.engine.step()
    else:
      for slot in [s for s in self._running if self.engine.is_prefilling(s)]:
        token = self.engine.prefill(slot)
        if token is not None:
          self._running[slot].first_token_time = self._running[slot].first_token_time or time.perf_counter()
          self._deliver(slot, token, self.engine.logprobs[slot][0])
      produced = self.engine.generate()
    now = time.perf_counter()
    for slot in produced:  # the first token of a request (a resumed one had its first before it was preempted)
      self._running[slot].first_token_time = self._running[slot].first_token_time or now
    if self.engine.preempted:  # out of pages: back to the front of the queue, recomputed when re-admitted
      with self._lock:
        for slot in reversed(self.engine.preempted):
          self._waiting.appendleft(self._running.pop(slot))
    for slot, tokens in produced.items():
      for token, logprob in zip(tokens, self.engine.logprobs[slot]):
        if slot not in self._running:  # ended by an earlier token of this step (stop or length)
          break
        self._deliver(slot, token, logprob)

  def _deliver(self, slot: int, token: int, logprob) -> None:
    request = self._running[slot]
    self.generated_tokens += 1
    request.output_ids.append(token)
    request.output_logprobs.append(logprob)
    params = request.params
    full = self._detokenize(request.output_ids)
    reason = None
    if token in params.stop_tokens:
      reason = "stop"
      full = self._detokenize(request.output_ids[:-1])
    cut = min((full.find(s) for s in params.stop_strings if s in full), default=-1)
    if cut >= 0:
      reason, full = "stop", full[:cut]
    if reason is None and len(request.output_ids) >= params.max_tokens:
      reason = "length"
    partial = len(full) - len(full.rstrip("\ufffd"))  # an incomplete UTF-8 sequence may still change
    emit_to = len(full) if reason else len(full) - max(_held_back(full, params.stop_strings), partial)
    emit_to = max(emit_to, len(request.text))
    delta = full[len(request.text):emit_to]
    request.text += delta
    if reason is None:
      request.on_event(Event([token], delta, logprobs=[logprob]))
      return
    with self._lock:
      self.engine.release(slot)
      del self._running[slot]
    self._finish_event(request, [token], delta, reason, [logprob])

  def _finish_event(self, request: Request, token_ids: list[int], text: str, reason: str,
                    logprobs: list | None = None) -> None:
    request.finish_time = time.perf_counter()
    request.finish_reason = reason
    request.on_event(Event(token_ids, text, reason, logprobs or []))
    if self.on_finish is not None:
      self.on_finish(request)
