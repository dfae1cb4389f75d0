"""int8 inference formats: W8A16 weight-only and W8A8 with SmoothQuant.

A quantized model has the float model's parameter tree with every matmul weight (wq, wk, wv, wo, w_in, w_gate,
w_out, the head, and the embedding, whose per-row scale doubles as the tied head's per-output scale) stored as int8
beside a float32 `<name>_scale` per output channel (symmetric, max-abs / 127). Norms, biases and learned positions
stay float. `ModelSpec.quant` picks how activations meet those weights:
  * `int8_weight` (W8A16): activations stay in the compute dtype; weights are dequantised inside the matmul.
  * `w8a8`: activations are quantised per token at run time (int8 x int8 -> int32). SmoothQuant
    (Xiao et al., 2023) first migrates activation outliers into the weights: for the matmuls that read a norm's
    output (q/k/v and the MLP input), s_j = max|X_j|^alpha / max|W_j|^(1 - alpha) per input channel j, W <- diag(s) W,
    and the norm's scale (and bias) <- / s, which leaves the float function unchanged.
  * `packed`: the b-bit codes of `infer.compress` (GPTQ, RTN, SparseGPT with quantization) served as stored: a uint8
    code stream per weight beside float32 scale and zero point per (group, output); see `packed_matmul`.
`ModelSpec.matmul_impl` runs the quantized matmuls with XLA (`xla`), our Pallas kernels (`pallas`), the native CPU
kernels (`native`, model/kernels/cpu_native.py) or, by default, `auto`: native where built and suited, else XLA.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from configs import base
from model.attention import Visibility
from model.kernels import cpu_native
from model import quantizer
from model.kernels import int8_matmul as q8

# (parent path, weight name, number of leading input axes after the "layers" axis); order is irrelevant.
BLOCK_WEIGHTS = ((("attn",), "wq", 1), (("attn",), "wk", 1), (("attn",), "wv", 1), (("attn",), "wo", 2),
                 (("mlp",), "w_in", 1), (("mlp",), "w_gate", 1), (("mlp",), "w_out", 1))
SMOOTHED = {"attn_norm": (("attn", "wq"), ("attn", "wk"), ("attn", "wv")),
            "mlp_norm": (("mlp", "w_in"), ("mlp", "w_gate"))}


# -- run time ----------------------------------------------------------------------------------------------------------

# Token rows up to which the native kernels run, in calls of cpu_native.MAX_ROWS rows that each read the weights once;
# above (long prefills) XLA's GEMM pays back its float copy of the weights. At 32 prompt rows, unpacking 4-bit codes
# for XLA took most of the time to first token (docs/performance.md).
NATIVE_MAX_ROWS = 4 * cpu_native.MAX_ROWS


def _by_rows(fn, x2: jax.Array) -> jax.Array:
  """fn(x rows) -> [rows, n], over blocks of at most cpu_native.MAX_ROWS rows of x2 [m, k], concatenated."""
  step = cpu_native.MAX_ROWS
  if x2.shape[0] <= step:
    return fn(x2)
  return jnp.concatenate([fn(x2[i:i + step]) for i in range(0, x2.shape[0], step)])


def _w8a16(x2, w2, s, impl: str, transposed: bool):
  """Weight-only: activations stay in the compute dtype, weights are dequantized inside the matmul."""
  if impl == "native":
    return _by_rows(lambda x: cpu_native.matmul_nk(x, w2, s) if transposed else cpu_native.matmul_kn(x, w2, s), x2)
  if impl == "pallas":  # transposed in place by the TPU kernel (no copy of a tied head), first elsewhere
    return q8.w8a16_matmul(x2, w2, s, transposed=transposed).astype(jnp.float32)
  w2 = w2.T if transposed else w2
  return jax.lax.dot_general(x2, w2.astype(x2.dtype), (((1,), (0,)), ((), ())),
                             preferred_element_type=jnp.float32) * s[None, :]


def _w8a8(x2, w2, s, impl: str, transposed: bool):
  """Activations quantized per token at run time: int8 x int8 -> int32, then both scales (the native kernels quantize
  inside the call, saving XLA's handful of elementwise passes per matmul)."""
  if impl == "native":
    return _by_rows(lambda x: (cpu_native.matmul_nk_w8a8 if transposed else cpu_native.matmul_kn_w8a8)(x, w2, s), x2)
  x_q, x_scale = q8.quantize_per_token(x2)
  if impl == "pallas":
    return q8.w8a8_matmul(x_q, x_scale, w2, s, transposed=transposed)
  return q8.w8a8_reference(x_q, x_scale, w2.T if transposed else w2, s)


MATMULS = {"int8_weight": _w8a16, "w8a8": _w8a8}  # int8 modes of model.quant -> their matmul ("packed" below)
base.check_implemented("model.quant", tuple(m for m in base.QUANT_MODES if m not in ("none", "packed")), MATMULS)


def resolve_impl(spec, rows: int, n: int, k: int, transposed: bool = False) -> str:
  """The implementation one quantized matmul of `rows` token rows, k inputs and n outputs runs with: `spec.matmul_impl`,
  where `auto` means the native CPU kernels when they are built here and the shape suits them (n a multiple of 64,
  at most NATIVE_MAX_ROWS rows), else XLA. `native` falls back to XLA for the shapes it does not take."""
  impl = spec.matmul_impl
  if impl == "pallas" and spec.quant == "packed":
    impl = "auto"  # no Pallas kernel for packed codes
  if impl == "native":
    cpu_native.require()
  elif impl != "auto":
    return impl
  elif not cpu_native.available():
    return "xla"
  fits = cpu_native.supports_nk(k) if transposed else cpu_native.supports_kn(n)
  return "native" if fits and rows <= NATIVE_MAX_ROWS else "xla"


def quantized_matmul(spec, x: jax.Array, w_q: jax.Array, scale: jax.Array, n_in: int,
                     transposed: bool = False) -> jax.Array:
  """x [..., *in] float @ w_q [*in, *out] int8 with per-output scales [*out] -> [..., *out] float32, in the format
  of `spec.quant`, run by `resolve_impl`. `transposed`: w_q is [out, in] (n_in 1), a tied embedding as the head.
  For `quant=packed`, w_q is the uint8 code stream and scale is [2, groups, *out] (scale, zero point), see
  `packed_matmul`; or, for the embedding and head of `head_quant="int8"`, int8 rows run as W8A16."""
  if spec.quant == "packed" and w_q.dtype == jnp.uint8:  # block weights; int8 here is the head of `head_quant`
    return packed_matmul(spec, x, w_q, scale, n_in)
  mode = "int8_weight" if spec.quant == "packed" else spec.quant
  if mode not in MATMULS:
    raise ValueError(f"quantized_matmul called with model.quant={spec.quant!r}; expected one of "
                     f"{sorted(MATMULS) + ['packed']}")
  in_shape, out_shape = ((w_q.shape[1:], w_q.shape[:1]) if transposed else (w_q.shape[:n_in], w_q.shape[n_in:]))
  k, n = int(np.prod(in_shape)), int(np.prod(out_shape))
  lead = x.shape[:x.ndim - n_in]
  x2, s = x.reshape(-1, k), scale.reshape(n).astype(jnp.float32)
  w2 = w_q.reshape(n, k) if transposed else w_q.reshape(k, n)
  impl = resolve_impl(spec, x2.shape[0], n, k, transposed)
  y = MATMULS[mode](x2.astype(jnp.float32) if impl == "native" else x2, w2, s, impl, transposed)
  return y.reshape(*lead, *out_shape)


def packed_matmul(spec, x: jax.Array, codes: jax.Array, scale_zero: jax.Array, n_in: int) -> jax.Array:
  """x [..., *in] @ a packed weight -> [..., *out] float32. codes: uint8 [k * n * bits / 8] in
  `cpu_native.to_kernel_layout`; scale_zero: float32 [2, k / group, *out], the weight is
  scale * (code - zero) per (group, output). The native kernel reads the codes as they are; the XLA path unpacks
  them into a float temporary inside the call (prefills over NATIVE_MAX_ROWS rows, or where the kernel is not built)."""
  groups, out_shape = scale_zero.shape[1], scale_zero.shape[2:]
  n = int(np.prod(out_shape))
  k = int(np.prod(x.shape[x.ndim - n_in:]))
  lead = x.shape[:x.ndim - n_in]
  x2 = x.reshape(-1, k).astype(jnp.float32)
  scale, zero = scale_zero[0].reshape(groups, n), scale_zero[1].reshape(groups, n)
  if resolve_impl(spec, x2.shape[0], n, k) == "native":
    y = _by_rows(lambda x: cpu_native.matmul_packed(x, codes, scale, zero, spec.quant_bits), x2)
  else:
    w = cpu_native.from_kernel_layout(codes, spec.quant_bits, k, n).astype(jnp.float32)
    w = (jnp.repeat(scale, k // groups, axis=0) * (w - jnp.repeat(zero, k // groups, axis=0)))
    y = jnp.dot(x2, w, preferred_element_type=jnp.float32)
  return y.reshape(*lead, *out_shape)


# -- conversion ----------------------------------------------------------------------------------------------------------


def _quantize(w: jax.Array, in_axes: tuple[int, ...]) -> tuple[jax.Array, jax.Array]:
  """Symmetric int8 over `in_axes` (max-abs / 127 per remaining index). Returns (int8 w, float32 scale)."""
  w = w.astype(jnp.float32)
  scale = jnp.maximum(jnp.abs(w).max(axis=in_axes), 1e-12) / 127.0
  return jnp.clip(jnp.round(w / jnp.expand_dims(scale, in_axes)), -127, 127).astype(jnp.int8), scale


def smooth(params: dict, act_absmax: dict[str, jax.Array], alpha: float) -> dict:
  """SmoothQuant migration on a float parameter dict (same function, flatter activations). act_absmax maps
  "attn_norm"/"mlp_norm" to [layers, embed] per-channel max |activation| at that norm's output."""
  if not 0.0 <= alpha <= 1.0:
    raise ValueError(f"SmoothQuant alpha={alpha} must be in [0, 1]")
  params = jax.tree.map(lambda x: x, params)  # shallow copy of the nested dicts
  blocks = params["blocks"]
  for norm, consumers in SMOOTHED.items():
    present = [(p, n) for p, n in consumers if n in blocks[p]]
    w_max = jnp.max(jnp.stack([jnp.abs(blocks[p][n]).reshape(*blocks[p][n].shape[:2], -1).max(-1)
                               for p, n in present]), axis=0)  # [layers, embed]
    s = jnp.power(jnp.maximum(act_absmax[norm], 1e-5), alpha) / jnp.power(jnp.maximum(w_max, 1e-5), 1.0 - alpha)
    s = jnp.clip(s, 1e-5, 1e5)
    for p, n in present:
      w = blocks[p][n]
      blocks[p][n] = (w * s.reshape(s.shape + (1,) * (w.ndim - 2))).astype(w.dtype)
    blocks[norm] = {k: (v / s).astype(v.dtype) for k, v in blocks[norm].items()}  # LayerNorm bias too
  return params


def quantize_params(params: dict, tie_embeddings: bool) -> dict:
  """Float parameter dict -> the int8 + scale dict that a `quant != "none"` ModelSpec expects."""
  q = jax.tree.map(lambda x: x, params)
  blocks = q["blocks"]
  for parent, name, n_in in BLOCK_WEIGHTS:
    group = blocks[parent[0]]
    if name in group:
      group[name], group[name + "_scale"] = _quantize(group[name], tuple(range(1, 1 + n_in)))
  return quantize_head(q, tie_embeddings)


def quantize_head(params: dict, tie_embeddings: bool) -> dict:
  """The embedding as int8 rows with one scale per vocabulary row (also the tied head's per-output scale), and an
  untied head per output column; the rest of `params` as it is (a shallow copy)."""
  q = dict(params)
  q["embed"], q["embed_scale"] = _quantize(q["embed"], (1,))
  if not tie_embeddings:
    q["head"], q["head_scale"] = _quantize(q["head"], (0,))
  return q


def calibrate(model, batches: Iterable[dict]) -> dict[str, jax.Array]:
  """Per-layer, per-channel max |activation| at the outputs of attn_norm and mlp_norm over `batches` (dicts with
  inputs, positions, segment_ids [B, L]); padding excluded. Returns {"attn_norm": [L, D], "mlp_norm": [L, D]}."""
  graphdef, state = nnx.split(model)

  @jax.jit
  def batch_stats(state, batch):
    m = nnx.merge(graphdef, state)
    blocks_def, blocks = nnx.split(m.blocks)
    real = (batch["segment_ids"] > 0)[..., None]
    visibility = Visibility.causal_self(batch["segment_ids"])
    x = m.embed_tokens(batch["inputs"], batch["positions"])
    attn_max, mlp_max = [], []
    for i in range(m.spec.num_layers):
      block = nnx.merge(blocks_def, jax.tree.map(lambda a: a[i], blocks))
      x, _, _, taps = block.forward(x, batch["positions"], visibility)
      attn_max.append(jnp.where(real, jnp.abs(taps["attn_in"].astype(jnp.float32)), 0).max(axis=(0, 1)))
      mlp_max.append(jnp.where(real, jnp.abs(taps["mlp_in"].astype(jnp.float32)), 0).max(axis=(0, 1)))
    return {"attn_norm": jnp.stack(attn_max), "mlp_norm": jnp.stack(mlp_max)}

  stats = None
  for batch in batches:
    new = batch_stats(state, {k: batch[k] for k in ("inputs", "positions", "segment_ids")})
    stats = new if stats is None else jax.tree.map(jnp.maximum, stats, new)
  if stats is None:
    raise ValueError("calibrate needs at least one batch")
  return stats


def quantize_model_params(spec, params: dict, mode: str, act_absmax: dict | None = None, alpha: float = 0.5):
  """Float params of `spec` -> (quantized spec, quantized params) for mode int8_weight or w8a8 (w8a8 needs the
  calibration statistics from `calibrate`)."""
  if mode not in MATMULS:
    raise ValueError(f"mode={mode!r}: use one of {', '.join(MATMULS)}")
  if spec.quant != "none":
    raise ValueError(f"the model is already quantized (quant={spec.quant!r})")
  if mode == "w8a8" and spec.norm_position != "pre":
    raise ValueError("w8a8 (SmoothQuant) folds scales into the norms before q/k/v and the MLP, which needs pre-norm "
                     f"blocks; this model has model.norm_position={spec.norm_position!r}: use int8_weight")
  if mode == "w8a8":
    if act_absmax is None:
      raise ValueError("w8a8 needs calibration statistics (act_absmax) for SmoothQuant")
    params = smooth(params, act_absmax, alpha)
  return dataclasses.replace(spec, quant=mode), quantize_params(params, spec.tie_embeddings)


def pack_rtn(params: dict, bits: int, group_size: int) -> dict:
  """Float parameter dict -> the `quant=packed` dict (block weights as `bits`-bit codes in the kernel layout beside
  [2, groups, *out] scale and zero point), by round-to-nearest on asymmetric min-max grids over groups of
  `group_size` inputs (infer.compress's RTN). Embeddings, head, norms and biases stay as they are. Runs eagerly
  (the code layout is built on the host)."""
  q = jax.tree.map(lambda x: x, params)
  blocks = q["blocks"]
  for parent, name, n_in in BLOCK_WEIGHTS:
    group = blocks.get(parent[0], {})
    if name not in group:
      continue
    w = jnp.asarray(group[name], jnp.float32)
    layers, out_shape = w.shape[0], w.shape[1 + n_in:]
    k, n = int(np.prod(w.shape[1:1 + n_in])), int(np.prod(out_shape))
    g = group_size or k
    if k % g:
      raise ValueError(f"group_size={group_size} must divide the {k} inputs of blocks.{parent[0]}.{name}")
    rows = w.reshape(layers, k // g, g, n).transpose(0, 1, 3, 2).reshape(-1, g)  # [layers * groups * n, g]
    scale, zero = quantizer.grid(rows, bits, symmetric=False)
    codes = quantizer.codes(rows, scale[:, None], zero[:, None], bits)
    codes = codes.reshape(layers, k // g, n, g).transpose(0, 1, 3, 2).reshape(layers, k, n)
    grid = jnp.stack([scale, zero]).reshape(2, layers, k // g, *out_shape).swapaxes(0, 1)
    group[name] = jnp.asarray(cpu_native.to_kernel_layout(np.asarray(codes), bits))
    group[name + "_scale"] = grid.astype(jnp.float32)
  return q


def nbytes(tree) -> int:
  """Total bytes of the arrays in a pytree (concrete or abstract)."""
  return int(sum(np.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree)))
