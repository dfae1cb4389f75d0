"""Kernel benchmark: TFLOP/s of causal attention (forward, forward+backward) and GB/s of int8 decode matmuls.

Attention: compares our Pallas flash attention with `jax.nn.dot_product_attention` (implementations `xla` and `cudnn`) and the
Pallas GPU attention that ships with JAX, at lengths 1k-8k and head dims 64 and 128, bfloat16, a fixed 16k tokens per
batch and 2048 model width. FLOPs count the causal half: forward 2 * 2 * B * H * L^2 * D / 2; backward 2.5x forward.
Matmuls: decode shapes (a few tokens times a large weight), bf16 weights vs W8A16 int8 weights through our Pallas
kernel and through XLA's dequantising dot; GB/s counts the weight bytes read, tokens/s is tokens per second through
that one matmul. Timings are medians of warmed-up, blocked runs. Prints tables and writes JSON.

  python -m scripts.bench_kernels [--lengths=1024,2048] [--head_dims=64,128] [--matmul_shapes=4096x4096]
      [--out=bench_kernels.json]
"""

from __future__ import annotations

import json
import statistics
import time

import jax
import jax.numpy as jnp
from absl import app, flags

from model.kernels import int8_matmul as q8
from model.kernels.flash_attention import flash_attention

_LENGTHS = flags.DEFINE_list("lengths", ["1024", "2048", "4096", "8192"], "Sequence lengths.")
_HEAD_DIMS = flags.DEFINE_list("head_dims", ["64", "128"], "Head dimensions.")
_TOKENS = flags.DEFINE_integer("tokens", 16384, "Batch x length, kept fixed across lengths.")
_WIDTH = flags.DEFINE_integer("width", 2048, "Heads x head_dim.")
_REPEATS = flags.DEFINE_integer("repeats", 10, "Timed repetitions per measurement.")
_MATMUL_SHAPES = flags.DEFINE_list("matmul_shapes", ["4096x4096", "4096x14336", "8192x8192"], "K x N weights.")
_MATMUL_TOKENS = flags.DEFINE_list("matmul_tokens", ["1", "8"], "Tokens (rows) per decode matmul.")
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


def matmul_rows(device: str) -> list[dict]:
  """bf16 vs W8A16 decode matmuls: GB/s of weight bytes and tokens/s through one matmul."""
  rows = []
  for shape in _MATMUL_SHAPES.value:
    k, n = map(int, shape.lower().split("x"))
    w = jax.random.normal(jax.random.key(1), (k, n), jnp.float32) * 0.02
    w_bf16 = w.astype(jnp.bfloat16)
    w_q, w_scale = q8.quantize_per_channel(w)
    for m in map(int, _MATMUL_TOKENS.value):
      x = jax.random.normal(jax.random.key(2), (m, k), jnp.bfloat16)
      cases = {
          "bf16_xla": (jax.jit(lambda x, w: jnp.dot(x, w, preferred_element_type=jnp.float32).astype(x.dtype)),
                       (x, w_bf16), 2 * k * n),
          "w8a16_pallas": (jax.jit(lambda x, w, s: q8.w8a16_matmul(x, w, s)), (x, w_q, w_scale), k * n + 4 * n),
          "w8a16_xla": (jax.jit(lambda x, w, s: (jnp.dot(x, w.astype(x.dtype), preferred_element_type=jnp.float32)
                                                 * s).astype(x.dtype)), (x, w_q, w_scale), k * n + 4 * n),
      }
      for name, (fn, args, weight_bytes) in cases.items():
        row = {"impl": name, "tokens": m, "k": k, "n": n}
        try:
          seconds = _median_seconds(fn, *args)
          row.update(gb_per_s=weight_bytes / seconds / 1e9, tokens_per_s=m / seconds)
        except Exception as e:  # e.g. a shape the backend cannot lower
          row.update(gb_per_s=None, tokens_per_s=None, error=f"{type(e).__name__}: {str(e).splitlines()[0][:120]}")
        rows.append(row)
        gb = "   -  " if row["gb_per_s"] is None else f"{row['gb_per_s']:7.1f}"
        tps = "   -  " if row["tokens_per_s"] is None else f"{row['tokens_per_s']:10.0f}"
        print(f"{device:>12} {k}x{n:<6} tokens={m:<3} {name:<13} {gb} GB/s  {tps} tokens/s", flush=True)
  return rows


def main(argv):
  del argv
  device = jax.devices()[0].device_kind
  matmuls = matmul_rows(device)
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
    json.dump({"device": device, "backend": jax.default_backend(), "jax": jax.__version__, "attention": rows,
               "matmul": matmuls}, f, indent=1)


if __name__ == "__main__":
  app.run(main)
