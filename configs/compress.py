"""One-shot post-training compression (`python -m infer.compress`): the method and its knobs, one line each.

  python -m infer.compress --workdir=runs/default --out=runs/default_sparsegpt50 \
      --compress.method=sparsegpt --compress.sparsity=0.5
"""

from __future__ import annotations

import ml_collections

METHODS = ("magnitude", "wanda", "sparsegpt", "gptq", "rtn")  # pruning: magnitude, wanda, sparsegpt; quantization: gptq, rtn
PRUNING_METHODS = ("magnitude", "wanda", "sparsegpt")
HESSIAN_METHODS = ("wanda", "sparsegpt", "gptq")  # the ones that run calibration data through the model
LAYER_SPARSITIES = ("uniform", "owl", "sensitivity")  # every block at `sparsity`; outlier-weighted per block (OWL);
# per block from the calibration-loss cost of pruning that block alone


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.method = "sparsegpt"  # one of METHODS
  c.sparsity = 0.5  # unstructured sparsity of the block linear layers (pruning methods); ignored for n:m
  c.layer_sparsity = "uniform"  # one of LAYER_SPARSITIES; owl: each block's sparsity from its activation outliers
  # (Yin et al., 2024); sensitivity: from the calibration loss lost when that block alone is magnitude-pruned; either
  # way blocks that matter more keep more weights, `sparsity` on average
  c.owl_threshold = 5.0  # OWL's M: a weight is an outlier when |w| * ||x|| exceeds M times its layer's mean
  c.sparsity_spread = 0.08  # OWL's lambda: block sparsities span up to sparsity +- 2 * spread (owl, sensitivity)
  c.prune_n = 0  # n:m pruning: zero prune_n of every prune_m consecutive inputs (e.g. 2:4); 0 = unstructured
  c.prune_m = 0
  c.bits = 0  # weight bits for gptq/rtn (2..8); with sparsegpt, joint quantization of the kept weights; 0 = none
  c.group_size = 0  # inputs sharing one quantization grid (gptq/rtn); 0 = one grid per output channel
  c.symmetric = False  # symmetric grids around zero instead of min-max
  c.act_order = False  # gptq: process inputs by decreasing Hessian diagonal
  c.block_size = 128  # columns per lazy-update block (sparsegpt, gptq); also the unstructured mask granularity
  c.damp = 0.01  # Hessian dampening, a fraction of its mean diagonal
  c.true_sequential = True  # compress q/k/v, out-projection, MLP in, MLP out in order, each on compressed inputs
  c.calibration_samples = 128  # calibration windows drawn from the training split (the papers use 128)
  c.calibration_len = 0  # tokens per window; 0 = the model's data.seq_len
  c.calibration_seed = 0  # numpy seed of the window draw
  c.batch_size = 8  # windows per calibration forward pass
  return c


def _fail(key, value, allowed):
  raise ValueError(f"compress.{key}={value!r} is invalid: {allowed}")


def validate(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Checks every key before any work; raises ValueError naming the key, its value and what is allowed."""
  if c.method not in METHODS:
    _fail("method", c.method, f"allowed values are {', '.join(METHODS)}")
  pruning = c.method in PRUNING_METHODS
  if c.prune_n or c.prune_m:
    if not pruning:
      _fail("prune_n", c.prune_n, f"n:m pruning needs a pruning method ({', '.join(PRUNING_METHODS)}), not {c.method}")
    if not 0 < c.prune_n < c.prune_m:
      _fail("prune_n", (c.prune_n, c.prune_m), "n:m pruning needs 0 < prune_n < prune_m (e.g. 2 and 4)")
  elif pruning and not 0.0 <= c.sparsity < 1.0:
    _fail("sparsity", c.sparsity, "must be in [0, 1)")
  if c.method in ("gptq", "rtn") and not 2 <= c.bits <= 8:
    _fail("bits", c.bits, f"{c.method} needs 2 to 8 bits")
  if c.method == "sparsegpt" and c.bits and not 2 <= c.bits <= 8:
    _fail("bits", c.bits, "joint quantization needs 2 to 8 bits (0 turns it off)")
  if c.method in ("magnitude", "wanda") and c.bits:
    _fail("bits", c.bits, f"{c.method} pruning has no quantization; use sparsegpt with bits, or gptq/rtn")
  if c.layer_sparsity not in LAYER_SPARSITIES:
    _fail("layer_sparsity", c.layer_sparsity, f"allowed values are {', '.join(LAYER_SPARSITIES)}")
  if c.layer_sparsity != "uniform":
    if not pruning or c.prune_n:
      _fail("layer_sparsity", c.layer_sparsity, f"{c.layer_sparsity} sets unstructured sparsities per block: it needs method "
            f"{', '.join(PRUNING_METHODS)} without n:m (got method={c.method}, prune_n={c.prune_n})")
    if not 0.0 <= c.sparsity_spread <= min(c.sparsity, 1.0 - c.sparsity):
      _fail("sparsity_spread", c.sparsity_spread, f"must be in [0, min(sparsity, 1 - sparsity)] = "
            f"[0, {min(c.sparsity, 1.0 - c.sparsity):g}] so every block's sparsity stays in [0, 1]")
    if not c.owl_threshold > 0:
      _fail("owl_threshold", c.owl_threshold, "must be > 0 (the paper uses 3 to 10)")
  if c.method == "sparsegpt" and c.bits and c.group_size:
    _fail("group_size", c.group_size, "joint sparsegpt quantization uses per-channel grids (group_size 0)")
  for key in ("group_size", "calibration_len"):
    if not isinstance(c[key], int) or c[key] < 0:
      _fail(key, c[key], "must be an int >= 0")
  for key in ("block_size", "calibration_samples", "batch_size"):
    if not isinstance(c[key], int) or c[key] <= 0:
      _fail(key, c[key], "must be an int > 0")
  if c.prune_m and c.block_size % c.prune_m:
    _fail("block_size", c.block_size, f"must be a multiple of prune_m={c.prune_m}")
  if c.damp < 0:
    _fail("damp", c.damp, "must be >= 0")
  return c


def describe(c: ml_collections.ConfigDict) -> str:
  """A short row label, e.g. 'sparsegpt 50%', 'sparsegpt 2:4 + 4-bit', 'gptq 4-bit g128'."""
  parts = [c.method]
  if c.method in PRUNING_METHODS:
    parts.append(f"{c.prune_n}:{c.prune_m}" if c.prune_n else f"{c.sparsity:.0%}")
    if c.layer_sparsity != "uniform":
      parts.append(c.layer_sparsity)
  if c.bits:
    parts.append(("+ " if c.method == "sparsegpt" else "") + f"{c.bits}-bit" + (f" g{c.group_size}" if c.group_size else "")
                 + (" act-order" if c.act_order and c.method == "gptq" else ""))
  return " ".join(parts)
