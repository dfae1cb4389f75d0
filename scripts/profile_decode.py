"""Where a decode step's time goes on this machine: traces `infer.generate`'s jitted prefill + decode program with
`jax.profiler` and sums the XLA thunks by kind over the worker threads.

  python -m scripts.profile_decode [--shape=shape_s] [--format=float32] [--batch=1] [--new_tokens=128]

Prints wall time per new token, thunks per decode step, thread-busy time per step, the share of the two worker
threads that was busy (the rest is idle gaps between thunks), and the thunk kinds by time.
"""

from __future__ import annotations

import collections
import glob
import os
import re
import tempfile
import time

import jax
from absl import app, flags
from jax._src import profiler as jax_profiler

from infer import generate
from scripts.bench_decode import _NEW, _PROMPT, build_model  # and their --prompt_len / --new_tokens flags

_SHAPE = flags.DEFINE_string("shape", "shape_s", "configs/<shape>.py")
_FORMAT = flags.DEFINE_string("format", "float32", "Weight format, as in bench_decode --formats.")
_BATCH = flags.DEFINE_integer("batch", 1, "Sequences decoded together.")
_TOP = flags.DEFINE_integer("top", 12, "Thunk kinds listed.")


def _kind(name: str) -> str:
  """'fusion.12' / 'wrapped_convert.3' -> 'fusion' / 'wrapped_convert' (the thunk kind, numbering dropped)."""
  return re.sub(r"[._]\d+$", "", name.split(":")[0])


def main(argv):
  del argv
  model = build_model(_SHAPE.value, _FORMAT.value).unstacked()  # as bench_decode: weights sliced once, up front
  prompts = [[1 + i % 100 for i in range(_PROMPT.value)]] * _BATCH.value
  args, kwargs = generate._prepare(model, prompts, _NEW.value, 0.0, 0, 1.0, 0, None)
  fn = generate._generate_padded
  jax.block_until_ready(fn(*args, **kwargs))  # compile and warm up outside the trace
  logdir = tempfile.mkdtemp(prefix="profile_decode-")
  with jax.profiler.trace(logdir):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args, **kwargs))
    wall = time.perf_counter() - start
  (path,) = glob.glob(os.path.join(logdir, "**", "*.xplane.pb"), recursive=True)
  with open(path, "rb") as f:
    data = jax_profiler.ProfileData.from_serialized_xspace(f.read())
  by_kind, count, busy = collections.Counter(), 0, 0.0
  for plane in data.planes:
    if not plane.name.startswith("/host:CPU"):
      continue
    for line in plane.lines:
      if "XLA" not in line.name and "Eigen" not in line.name and "tf_" not in line.name:
        continue
      for event in line.events:
        if event.name.startswith(("ThunkExecutor", "Execute", "PjRt", "Thread")):
          continue
        by_kind[_kind(event.name)] += event.duration_ns / 1e9
        count += 1
        busy += event.duration_ns / 1e9
  steps = _NEW.value
  print(f"{_SHAPE.value} {_FORMAT.value} batch {_BATCH.value}: {wall / steps * 1e3:.2f} ms per new token "
        f"({_BATCH.value * steps / wall:,.0f} tokens/s, prefill included)")
  print(f"thunks per step {count / steps:.0f}; thread-busy {busy / steps * 1e3:.2f} ms per step; "
        f"worker occupancy {busy / (2 * wall):.0%} of 2 threads")
  for kind, seconds in by_kind.most_common(_TOP.value):
    print(f"  {seconds / busy:6.1%}  {seconds / steps * 1e3:7.3f} ms/step  {kind}")


if __name__ == "__main__":
  app.run(main)
