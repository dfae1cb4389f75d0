"""Compresses a whole model with one method of `configs/compress.py`, recording what each layer became, and writes
the result as a compressed workdir (`compress_workdir`)."""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from configs import compress as compress_config
from infer import evaluate
from infer.compress import calibrate, gptq, sparsegpt, storage, wanda
from infer.compress.result import Compressed
from model import transformer


def layer_compressor(c: ml_collections.ConfigDict, sparsities: list[float] | None = None):
  """fn(block index, w [in, out] float32, H [in, in] or None) -> Compressed, for the method of config `c`;
  `sparsities` (one per block, OWL) replaces c.sparsity block by block."""
  sparsity = lambda i: c.sparsity if sparsities is None else sparsities[i]  # noqa: E731
  if c.method == "magnitude":
    return lambda i, w, h: sparsegpt.magnitude_prune(w, sparsity=sparsity(i), prune_n=c.prune_n, prune_m=c.prune_m)
  if c.method == "wanda":
    return lambda i, w, h: wanda.prune_layer(w, h, sparsity=sparsity(i), prune_n=c.prune_n, prune_m=c.prune_m)
  if c.method == "sparsegpt":
    return lambda i, w, h: sparsegpt.prune_layer(w, h, sparsity=sparsity(i), prune_n=c.prune_n, prune_m=c.prune_m,
                                                 block_size=c.block_size, damp=c.damp, quant_bits=c.bits or None,
                                                 symmetric=c.symmetric)
  if c.method == "gptq":
    return lambda i, w, h: gptq.quantize_layer(w, h, bits=c.bits, group_size=c.group_size, symmetric=c.symmetric,
                                               act_order=c.act_order, block_size=c.block_size, damp=c.damp)
  return lambda i, w, h: gptq.rtn_layer(w, bits=c.bits, group_size=c.group_size, symmetric=c.symmetric)


def needs_calibration(c: ml_collections.ConfigDict) -> bool:
  """Whether config `c` runs calibration data through the model (Hessian methods, and OWL's outlier count)."""
  return c.method in compress_config.HESSIAN_METHODS or c.layer_sparsity != "uniform"


def block_outlier_ratios(model, samples: np.ndarray, threshold: float, batch_size: int = 8) -> list[float]:
  """OWL's layerwise outlier distribution: per block, the share of its linear weights whose Wanda score exceeds
  `threshold` times their layer's mean, on calibration activations of the dense model."""
  counts: dict[int, list[int]] = {}

  def record(i, path, w, h):
    n, total = wanda.outliers(w, h, threshold)
    c = counts.setdefault(i, [0, 0])
    c[0], c[1] = c[0] + n, c[1] + total
    return w

  calibrate.sequential(model, samples, record, batch_size=batch_size, true_sequential=False)
  return [counts[i][0] / counts[i][1] for i in sorted(counts)]


def block_sensitivities(model, samples: np.ndarray, sparsity: float, batch_size: int = 8) -> list[float]:
  """Per block, the mean next-token loss on the calibration windows `samples` [n, L] gained when only that block's
  linear weights are magnitude-pruned to `sparsity` (a cheap probe: forward passes only)."""
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  window_nll = evaluate.make_window_nll(model)
  stream, length = np.asarray(samples).reshape(-1), samples.shape[1]

  def loss(p):
    return evaluate.stream_perplexity(transformer.from_params(model.spec, p), stream, length, batch_size,
                                      window_nll)["loss"]

  base, out = loss(params), []
  for b in range(model.spec.num_layers):
    probe = jax.tree.map(lambda x: x, params)
    for weights in calibrate.LINEAR_INPUTS.values():
      for parent, name in weights:
        w = probe["blocks"][parent].get(name)
        if w is None:
          continue
        k = int(np.prod(w.shape[1:1 + calibrate.N_IN.get(name, 1)]))
        pruned = sparsegpt.magnitude_prune(w[b].reshape(k, -1), sparsity=sparsity).weight
        probe["blocks"][parent][name] = w.at[b].set(pruned.reshape(w.shape[1:]).astype(w.dtype))
    out.append(loss(probe) - base)
  return out


def compress_model(model, c: ml_collections.ConfigDict, samples: np.ndarray | None):
  """Compresses every block linear layer of `model` (embeddings, head, norms and biases stay float).

  Returns (params: the float parameter dict with compressed weights, layers: {"attn/wq": [Compressed per layer]},
  seconds spent, per-block sparsity targets or None)."""
  compress_config.validate(c)
  start = time.perf_counter()
  sparsities = None
  if c.layer_sparsity == "owl":
    ratios = block_outlier_ratios(model, samples, c.owl_threshold, c.batch_size)
    sparsities = wanda.owl_sparsities(ratios, c.sparsity, c.sparsity_spread)
  elif c.layer_sparsity == "sensitivity":
    costs = block_sensitivities(model, samples, c.sparsity, c.batch_size)
    sparsities = wanda.owl_sparsities(costs, c.sparsity, c.sparsity_spread)
  fn = layer_compressor(c, sparsities)
  layers: dict[str, list[Compressed]] = {}

  def compress_fn(i, path, w, h):
    out = fn(i, w, h)
    layers.setdefault(path, []).append(out)
    return out.weight

  params = calibrate.sequential(model, samples, compress_fn, batch_size=c.batch_size,
                                true_sequential=c.true_sequential,
                                needs_hessian=c.method in compress_config.HESSIAN_METHODS)
  jax.block_until_ready(params)
  return params, layers, time.perf_counter() - start, sparsities


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


def compress_workdir(config, model, tokenizer, step: int, c, *, source_workdir: str, out: str | None = None,
                     samples=None) -> dict:
  """Compresses a loaded float model with the method config `c` (configs/compress.py), optionally saving the
  result as workdir `out`. Draws calibration samples from the training split unless `samples` [n, L] are given.
  Returns {"model": the compressed float model, "params", "layers", "metadata"}."""
  compress_config.validate(c)
  if model.spec.num_experts:
    raise ValueError(f"the model has {model.spec.num_experts}-expert MoE layers; compress it with QMoE "
                     "(python -m scripts.case_study_qmoe, infer/compress/qmoe.py)")
  if model.spec.quant != "none":
    raise ValueError(f"the model is already int8-quantized (model.quant={model.spec.quant!r}); compress a float one")
  if samples is None and needs_calibration(c):
    samples = calibrate.calibration_samples(config, tokenizer, num_samples=c.calibration_samples,
                                            seq_len=c.calibration_len or config.data.seq_len,
                                            seed=c.calibration_seed)
  params, layers, seconds, sparsities = compress_model(model, c, samples)
  metadata = {"label": compress_config.describe(c), "method": c.to_dict(), "time_s": seconds,
              "summary": summary(layers), "block_sparsity_targets": sparsities}
  if out is not None:
    metadata = storage.save(out, config=config, source_workdir=source_workdir, step=step, params=params,
                            layers=layers, metadata=metadata)
  return {"model": transformer.from_params(model.spec, params), "params": params, "layers": layers,
          "metadata": metadata}
