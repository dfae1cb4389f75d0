"""Run the command-line entry points on tcmalloc when the machine has it.

XLA's CPU runtime allocates and frees large temporaries at every step; glibc's malloc hands those back to the kernel
and takes them again, so a shape-S training step costs about 240,000 minor page faults and 14% of its CPU time in
the kernel (`scripts/bench_train.py` reports both). tcmalloc keeps them: measured in one run on a 2-core AMD EPYC
(AVX-512, AVX512-BF16), shape S trained 1.24x faster with the page faults gone (docs/performance.md).

A process cannot swap its allocator after start-up, so `reexec_with_tcmalloc` restarts the command once with
LD_PRELOAD set, before anything heavy is imported. It does nothing when tcmalloc is already loaded, when the library
is not installed (Debian/Ubuntu: `apt-get install libtcmalloc-minimal4`), or when PEAKLLM_MALLOC=system.
"""

from __future__ import annotations

import ctypes.util
import os
import sys

ENV = "PEAKLLM_MALLOC"  # "system" keeps glibc's malloc
_CANDIDATES = ("/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4",
               "/usr/lib/aarch64-linux-gnu/libtcmalloc_minimal.so.4", "/usr/lib64/libtcmalloc_minimal.so.4",
               "/usr/lib/libtcmalloc_minimal.so.4")


def find_tcmalloc() -> str | None:
  """The library to preload (a path, or a soname the dynamic loader finds), or None when tcmalloc is not installed."""
  for path in _CANDIDATES:
    if os.path.exists(path):
      return path
  return ctypes.util.find_library("tcmalloc_minimal") or ctypes.util.find_library("tcmalloc")


def reexec_with_tcmalloc(module: str) -> None:
  """Restarts `python -m module ARGS` with tcmalloc preloaded when that is possible and not yet the case (see the
  module docstring); returns without doing anything otherwise. Call it first in a `__main__`."""
  if os.environ.get(ENV, "") == "system" or "tcmalloc" in os.environ.get("LD_PRELOAD", ""):
    return
  path = find_tcmalloc()
  if path is None:
    return
  env = dict(os.environ, LD_PRELOAD=" ".join(p for p in (path, os.environ.get("LD_PRELOAD", "")) if p))
  env[ENV] = "tcmalloc"  # also stops a second restart if the preload did not take
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, [sys.executable, "-m", module, *sys.argv[1:]], env)
