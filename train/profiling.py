"""`jax.profiler` traces of chosen steps and a summary of where their time went (public `jax.profiler` APIs only).

A trace directory holds `plugins/profile/<run>/*.xplane.pb` (TensorBoard's profile plugin: `tensorboard --logdir DIR`)
and `perfetto_trace.json.gz` (open in https://ui.perfetto.dev). `summarize(DIR)` reads the newest run back and ranks
the compiled program's operations (XLA thunks on CPU, kernels on GPU/TPU) by their summed time.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import glob
import os
import re
import time

import jax


@dataclasses.dataclass(frozen=True)
class OpTime:
  name: str  # the operation's kind: its HLO name without numbering ('fusion.12' -> 'fusion')
  seconds: float  # summed over every thread and every occurrence
  count: int


@dataclasses.dataclass(frozen=True)
class Summary:
  trace_dir: str  # the run directory holding the .xplane.pb and perfetto trace
  wall_s: float  # wall time of the traced region (0 when unknown)
  busy_s: float  # summed duration of every operation on every thread
  ops: list[OpTime]  # by time, largest first
  threads: int  # threads that ran at least one operation

  def table(self, top: int = 15, steps: int = 1) -> str:
    """A plain-text ranking: share of busy time, ms per step, count per step, kind."""
    lines = [f"trace: {self.trace_dir}"]
    if self.wall_s:
      lines.append(f"{steps} step(s) in {self.wall_s * 1e3:,.1f} ms wall; operations busy {self.busy_s * 1e3:,.1f} ms "
                   f"on {self.threads} thread(s) ({self.busy_s / (self.wall_s * max(self.threads, 1)):.0%} occupancy)")
    lines.append(f"{'share':>7} {'ms/step':>9} {'count/step':>10}  operation")
    for op in self.ops[:top]:
      lines.append(f"{op.seconds / max(self.busy_s, 1e-12):7.1%} {op.seconds / steps * 1e3:9.2f} "
                   f"{op.count / steps:10.1f}  {op.name}")
    return "\n".join(lines)


def _kind(name: str) -> str:
  return re.sub(r"([._]\d+)+$", "", name.split(":")[0].strip())


def summarize(logdir: str, wall_s: float = 0.0, by_kind: bool = True) -> Summary:
  """Ranks the operations of the newest trace under `logdir`. An operation is an event carrying an `hlo_op` stat
  (what XLA's runtimes record per executed op), grouped by kind (`by_kind`) or by HLO instruction name (to match
  `compiled.as_text()`); FileNotFoundError names `logdir` when it holds no trace."""
  paths = sorted(glob.glob(os.path.join(logdir, "plugins", "profile", "*", "*.xplane.pb")), key=os.path.getmtime)
  if not paths:
    raise FileNotFoundError(f"no jax.profiler trace (*.xplane.pb) under {logdir}")
  data = jax.profiler.ProfileData.from_file(paths[-1])
  seconds, counts, threads = collections.Counter(), collections.Counter(), set()
  for plane in data.planes:
    for line in plane.lines:
      for event in line.events:
        stats = dict(event.stats)
        if "hlo_op" not in stats:
          continue
        kind = _kind(str(stats["hlo_op"])) if by_kind else str(stats["hlo_op"])
        seconds[kind] += event.duration_ns / 1e9
        counts[kind] += 1
        threads.add((plane.name, line.name))
  ops = [OpTime(name, s, counts[name]) for name, s in seconds.most_common()]
  return Summary(os.path.dirname(paths[-1]), wall_s, sum(seconds.values()), ops, len(threads))


@contextlib.contextmanager
def trace(logdir: str):
  """Traces the body into `logdir` (TensorBoard and Perfetto files); yields a dict that gets 'wall_s' on exit."""
  os.makedirs(logdir, exist_ok=True)
  timing: dict[str, float] = {}
  with jax.profiler.trace(logdir, create_perfetto_trace=True):
    start = time.perf_counter()
    try:
      yield timing
    finally:
      timing["wall_s"] = time.perf_counter() - start


class Recording:
  """A trace started by `start(logdir)` and ended by `stop()`, which returns its `Summary` (wall time included)."""

  def __init__(self):
    self.logdir: str | None = None
    self._start = 0.0

  @property
  def active(self) -> bool:
    return self.logdir is not None

  def start(self, logdir: str) -> None:
    os.makedirs(logdir, exist_ok=True)
    jax.profiler.start_trace(logdir, create_perfetto_trace=True)
    self.logdir, self._start = logdir, time.perf_counter()

  def stop(self) -> Summary:
    wall = time.perf_counter() - self._start
    jax.profiler.stop_trace()
    logdir, self.logdir = self.logdir, None
    return summarize(logdir, wall)


class StepProfiler:
  """Traces the 1-based steps `first..last` of a loop: call `before(step)` before step `step` runs and
  `after(step, outputs)` once it was dispatched; the trace stops after `last`'s outputs are ready and
  `summary` holds the ranking (None until then)."""

  def __init__(self, steps: tuple[int, int] | None, logdir: str):
    self.steps, self.logdir = steps, logdir
    self.summary: Summary | None = None
    self.traced: tuple[int, int] | None = None  # the steps the finished trace covers
    self._recording = Recording()
    self._first, self._last = 0, 0

  @property
  def active(self) -> bool:
    return self._recording.active

  def before(self, step: int) -> None:
    """Starts the trace when `step` is the first profiled step; a run resumed inside the range starts it here too."""
    if self.steps and self.steps[0] <= step <= self.steps[1] and not self.active and self.traced is None:
      self._recording.start(self.logdir)
      self._first = step

  def after(self, step: int, outputs) -> None:
    self._last = step
    if self.active and step >= self.steps[1]:
      self.stop(outputs)

  def stop(self, outputs=None) -> None:
    """Ends an active trace once `outputs` are ready (also on an early exit of the loop) and summarizes it."""
    if not self.active:
      return
    jax.block_until_ready(outputs)
    self.summary = self._recording.stop()
    self.traced = (self._first, self._last)
