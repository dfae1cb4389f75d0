"""Decode-sized matmuls by weight format on this device: f32, int8 widened to f32 then a dot (W8A16 as XLA runs it),
int8 x int8 -> int32 (W8A8), and the int8 -> f32 convert alone. Median of 50 runs; GB/s counts the stored weight.

  python -m scripts.bench_matvec [--weights=768x3072,3072x768] [--rows=1,8]
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

_SHAPES = flags.DEFINE_list("weights", ["768x3072", "3072x768"], "Weight shapes KxN (GPT-2 124M's MLP by default).")
_BATCHES = flags.DEFINE_list("rows", ["1", "8"], "Rows of activations (batch).")


def median_seconds(fn, *args, repeats: int = 50) -> float:
  fn = jax.jit(fn)
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return float(np.median(times))


def main(argv):
  del argv
  int_dot = lambda x, w: jax.lax.dot_general(x, w, (((1,), (0,)), ((), ())),  # noqa: E731
                                             preferred_element_type=jnp.int32)
  print("| weight k x n | batch | f32 dot | int8 -> f32 convert + dot | int8 x int8 -> int32 dot | convert alone |")
  print("|---|---|---|---|---|---|")
  for shape in _SHAPES.value:
    k, n = map(int, shape.split("x"))
    w = jax.random.normal(jax.random.key(0), (k, n), jnp.float32)
    w_q, scale = (w * 20).astype(jnp.int8), jnp.ones((n,), jnp.float32)
    convert = median_seconds(lambda a: a.astype(jnp.float32), w_q)
    for m in map(int, _BATCHES.value):
      x = jax.random.normal(jax.random.key(1), (m, k), jnp.float32)
      cells = [(median_seconds(lambda a, b: a @ b, x, w), w.nbytes),
               (median_seconds(lambda a, b, s: (a @ b.astype(jnp.float32)) * s, x, w_q, scale), w_q.nbytes),
               (median_seconds(int_dot, (x * 20).astype(jnp.int8), w_q), w_q.nbytes), (convert, w_q.nbytes)]
      row = " | ".join(f"{t * 1e6:,.0f} us ({b / t / 1e9:.1f} GB/s)" for t, b in cells)
      print(f"| {k} x {n} | {m} | {row} |", flush=True)


if __name__ == "__main__":
  app.run(main)
