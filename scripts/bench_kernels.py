"""Attention kernel benchmark: TFLOP/s of causal attention forward and forward+backward.

Compares our Pallas flash attention with `jax.nn.dot_product_attention` (implementations `xla` and `cudnn`) and the
Pallas GPU attention that ships with JAX, at lengths 1k-8k and head dims 64 and 128, bfloat16, a fixed 16k tokens per
batch and 2048 model width. FLOPs count the causal half: forward 2 * 2 * B * H * L^2 * D / 2; backward 2.5x forward.
Timings are medians of warmed-up, blocked runs. Prints a table and writes JSON.

  python -m scripts.bench_kernels [--lengths=1024,2048] [--head_dims=64,128] [--out=bench_kernels.json]
"""

from __future__ import annotations

import json
import statistics
import time

import jax
import jax.numpy as jnp
from absl import app, flags

from model.kernels.flash_attention import flash_attention

_LENGTHS = flags.DEFINE_list("lengths", ["1024", "2048", "4096", "8192"], "Sequence lengths.")
_HEAD_DIMS = flags.DEFINE_list("head_dims", ["64", "128"], "Head dimensions.")
_TOKENS = flags.DEFINE_integer("tokens", 16384, "Batch x length, kept fixed across lengths.")
_WIDTH = flags.DEFINE_integer("width", 2048, "Heads x head_dim.")
_REPEATS = flags.DEFINE_integer("repeats", 10, "Timed repetitions per measurement.")
_OUT = flags.DEFINE_string("out", "bench_kernels.json", "Where to write the JSON results.")


def _implementations():
  impls = {"peakllm_pallas": lambda q, k, v: flash_attention(q, k, v, causal=True)}
  impls["jax_nn_xla"] = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="xla")
  if jax.default_backend() == "gpu":
    impls["jax_nn_cudnn"] = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True,
                                                                           implementation="cudnn")
    from jax.experimental.pallas.ops.gpu import attention as jax_gpu_attention

    impls["jax_pallas_gpu"] = lambda q, k, v: jax_gpu_attention.mha(q, k, v, segment_ids=None, causal=True,
                                                                    sm_scale=q.shape[-1] ** -0.5)
  return impls


def _median_seconds(fn, *args) -> float:
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(_REPEATS.value):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def main(argv):
  del argv
  device = jax.devices()[0].device_kind
  rows = []
  for d in map(int, _HEAD_DIMS.value):
    for length in map(int, _LENGTHS.value):
      b, h = max(1, _TOKENS.value // length), _WIDTH.value // d
      ks = jax.random.split(jax.random.key(0), 3)
      q, k, v = (jax.random.normal(key, (b, length, h, d), jnp.bfloat16) for key in ks)
      fwd_flops = 2 * 2 * b * h * length * length * d / 2
      for name, attn in _implementations().items():
        row = {"impl": name, "length": length, "head_dim": d, "batch": b, "heads": h}
        fwd = jax.jit(attn)
        fwd_bwd = jax.jit(jax.grad(lambda q, k, v, f=attn: f(q, k, v).astype(jnp.float32).sum(), argnums=(0, 1, 2)))
        for mode, fn, flops in (("fwd", fwd, fwd_flops), ("fwd_bwd", fwd_bwd, 3.5 * fwd_flops)):
          try:
            row[f"{mode}_tflops"] = flops / _median_seconds(fn, q, k, v) / 1e12
          except Exception as e:  # unsupported shape or out of memory: report, keep going
            row[f"{mode}_tflops"] = None
            row[f"{mode}_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
        rows.append(row)
        fmt = lambda x: "   -  " if x is None else f"{x:6.1f}"  # noqa: E731
        print(f"{device:>12} d={d:<4} L={length:<5} {name:<16} fwd {fmt(row['fwd_tflops'])} TFLOP/s   "
              f"fwd+bwd {fmt(row['fwd_bwd_tflops'])} TFLOP/s", flush=True)
  with open(_OUT.value, "w", encoding="utf-8") as f:
    json.dump({"device": device, "backend": jax.default_backend(), "jax": jax.__version__, "rows": rows}, f, indent=1)


if __name__ == "__main__":
  app.run(main)
