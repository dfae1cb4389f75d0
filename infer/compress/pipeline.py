"""Compresses a whole model with one method of `configs/compress.py`, recording what each layer became."""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from configs import compress as compress_config
from infer.compress import calibrate, gptq, sparsegpt
from infer.compress.result import Compressed


def layer_compressor(c: ml_collections.ConfigDict):
  """fn(w [in, out] float32, H [in, in] or None) -> Compressed, for the method of config `c`."""
  if c.method == "magnitude":
    return lambda w, h: sparsegpt.magnitude_prune(w, sparsity=c.sparsity, prune_n=c.prune_n, prune_m=c.prune_m)
  if c.method == "sparsegpt":
    return lambda w, h: sparsegpt.prune_layer(w, h, sparsity=c.sparsity, prune_n=c.prune_n, prune_m=c.prune_m,
                                              block_size=c.block_size, damp=c.damp, quant_bits=c.bits or None,
                                              symmetric=c.symmetric)
  if c.method == "gptq":
    return lambda w, h: gptq.quantize_layer(w, h, bits=c.bits, group_size=c.group_size, symmetric=c.symmetric,
                                            act_order=c.act_order, block_size=c.block_size, damp=c.damp)
  return lambda w, h: gptq.rtn_layer(w, bits=c.bits, group_size=c.group_size, symmetric=c.symmetric)


def compress_model(model, c: ml_collections.ConfigDict, samples: np.ndarray | None):
  """Compresses every block linear layer of `model` (embeddings, head, norms and biases stay float).

  Returns (params: the float parameter dict with compressed weights, layers: {"attn/wq": [Compressed per layer]},
  seconds spent)."""
  compress_config.validate(c)
  fn = layer_compressor(c)
  layers: dict[str, list[Compressed]] = {}

  def compress_fn(i, path, w, h):
    out = fn(w, h)
    layers.setdefault(path, []).append(out)
    return out.weight

  start = time.perf_counter()
  params = calibrate.sequential(model, samples, compress_fn, batch_size=c.batch_size,
                                true_sequential=c.true_sequential,
                                needs_hessian=c.method in compress_config.HESSIAN_METHODS)
  jax.block_until_ready(params)
  return params, layers, time.perf_counter() - start


def summary(layers: dict[str, list[Compressed]]) -> dict:
  """Per-weight sparsity per layer and bits, and totals over all compressed weights."""
  total = zeros = code_bits = grid_bits = 0
  per_weight = {}
  for path, results in layers.items():
    per_weight[path] = {"sparsity": [round(r.sparsity, 6) for r in results], "bits": results[0].bits,
                        "group_size": results[0].group_size}
    for r in results:
      n = r.weight.size
      total += n
      zeros += int(jnp.sum(r.weight == 0))
      if r.bits:
        code_bits += n * r.bits
        grid_bits += 32 * r.scale.size + 8 * r.zero.size  # as stored: float32 scale, uint8 zero
      else:
        code_bits += n * 32
  return {"weights": per_weight, "compressed_params": total, "sparsity": zeros / max(total, 1),
          "bits_per_weight": (code_bits + grid_bits) / max(total, 1),
          "code_bits_per_weight": code_bits / max(total, 1)}
