"""QMoE (Frantar and Alistarh, 2023): sub-1-bit compression of the experts of an MoE model.

1. Calibration routes tokens exactly as the model does (top-k router, layer by layer, each MoE layer fed by the
   already-compressed layers before it). Each expert's input Hessian H_e = 2/n_e X_e^T X_e is accumulated from the
   tokens routed to it, for all experts at once from [experts, capacity, d] dispatch buffers, with a per-expert
   token cap (token_cap times the expert's fair share per batch) so hot experts cannot dominate memory or time.
2. Every expert matrix is quantized with GPTQ to a ternary grid {lo, 0, hi} per output row (lo = min, hi = max of
   the row, stored as float16), all experts of a layer in one vmapped call, with stronger Hessian dampening than
   GPTQ's default (damp 0.1). A weight becomes 0 unless it lies beyond `dead_zone` times lo or hi (0.5: nearest
   point); a wider dead zone buys more zeros, hence fewer bits, and GPTQ spreads the extra error over the weights
   not yet quantized. w_in/w_gate are compressed first; w_out is then calibrated on the compressed experts' hidden
   states.
3. `encode_model` codes the ternary symbols losslessly with one static Tunstall dictionary of frequent ternary runs
   shared by every expert of every layer (`ternary_code.py`); `model/kernels/ternary_matvec.py` decodes inside the
   matrix-vector product. Sizes count everything stored: codewords at their width, one row length per row (8 or
   16 bits; the offsets are their prefix sums, computed at load), float16 lo/hi per row, and the dictionary (2-bit
   symbols, uint8 lengths).

Attention, dense MLPs, routers, norms and embeddings stay in their float format, as in the paper.
"""

from __future__ import annotations

import dataclasses
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from infer.compress import obs
from model import quantizer
from infer.compress import ternary_code as tc
from model import moe as moe_lib
from model.attention import Visibility

EXPERT_WEIGHTS = ("w_in", "w_gate", "w_out")
GRID_DTYPE = np.float16  # how lo/hi are stored; grids are rounded to it before quantizing, so loads are bit-exact
MODES = ("ternary_gptq", "ternary_rtn", "gptq", "rtn")  # gptq/rtn: uniform `bits` per-channel grids


@dataclasses.dataclass
class ExpertResult:
  """One expert weight stack: weight [E, in, out] float32 (what the model computes with), codes [E, in, out] int32
  (ternary symbols 0/1/2 or uniform codes), grid (lo, hi) or (scale, zero), each [E, out]."""

  weight: jax.Array
  codes: jax.Array
  grid: tuple[jax.Array, jax.Array]
  ternary: bool


def _one_expert(w, h, *, mode, bits, damp, block_size, dead_zone):
  """w [in, out], h [in, in] -> (weight [in, out], codes [in, out], grid pair [out], finite) for one expert."""
  wt = w.astype(jnp.float32).T  # [out, in]
  ternary = mode.startswith("ternary")
  if ternary:
    lo, hi = (g.astype(GRID_DTYPE).astype(jnp.float32) for g in quantizer.ternary_grid(wt))
  else:
    lo, hi = quantizer.grid(wt, bits, False)  # scale, zero
  if mode.endswith("rtn"):
    q = (quantizer.ternary_dequantize(quantizer.ternary_codes(wt, lo[:, None], hi[:, None], dead_zone), lo[:, None],
                                      hi[:, None])
         if ternary else quantizer.fake_quantize(wt, lo[:, None], hi[:, None], bits))
    finite = jnp.array(True)
  else:
    u, dead = obs.factor_unchecked(h, damp)
    wt = jnp.where(dead[None, :], 0.0, wt)
    res = obs.sweep(wt, u, block_size=block_size, bits=0 if ternary else bits, ternary=ternary, dead_zone=dead_zone,
                    static_scale=jnp.broadcast_to(lo[:, None], wt.shape),
                    static_zero=jnp.broadcast_to(hi[:, None], wt.shape))
    q, finite = res.weights, jnp.all(jnp.isfinite(u))
  codes = (quantizer.ternary_codes(q, lo[:, None], hi[:, None]) if ternary
           else quantizer.codes(q, lo[:, None], hi[:, None], bits))
  return q.T, codes.T, (lo, hi), finite


def check_dead_zone(dead_zone: float) -> None:
  if not 0.5 <= dead_zone < 1.0:
    raise ValueError(f"dead_zone={dead_zone} must be in [0.5, 1): the share of lo/hi below which a weight rounds to "
                     "0 (0.5: the nearest grid point)")


def compress_experts(w: jax.Array, h: jax.Array | None, *, mode: str = "ternary_gptq", bits: int = 2,
                     damp: float = 0.1, block_size: int = 128, dead_zone: float = 0.5) -> ExpertResult:
  """All experts of one weight at once (vmapped). w [E, in, out]; h [E, in, in] (unused by the RTN modes);
  dead_zone: see the module docstring (ternary modes)."""
  if mode not in MODES:
    raise ValueError(f"mode={mode!r}; use one of {', '.join(MODES)}")
  check_dead_zone(dead_zone)
  if h is None:
    h = jnp.broadcast_to(jnp.eye(w.shape[1], dtype=jnp.float32), (w.shape[0], w.shape[1], w.shape[1]))
  fn = functools.partial(_one_expert, mode=mode, bits=bits, damp=damp, block_size=block_size, dead_zone=dead_zone)
  q, codes, grid, finite = jax.vmap(fn)(w, h)
  if not bool(jnp.all(finite)):
    raise ValueError(f"an expert Hessian is not positive definite at damp={damp}; raise damp")
  return ExpertResult(q, codes, grid, mode.startswith("ternary"))


def _expert_hessians(block, xs, positions, visibility, token_cap: float, which: str):
  """Per-expert X^T X sums [E, k, k] and token counts [E] of the MoE block's expert inputs (which="in") or hidden
  states (which="out") over the batches xs, with tokens routed by the block's router."""
  moe = block.moe
  spec = moe.spec
  e = spec.num_experts
  activation = "silu" if spec.family == "llama" else spec.activation

  @nnx.jit
  def batch_stats(block, x):
    _, _, _, taps = block.forward(x, positions, visibility)
    flat = taps["mlp_in"].reshape(-1, x.shape[-1]).astype(jnp.float32)
    r = moe_lib.route(flat, block.moe.router[...], spec.experts_per_token, spec.moe_renormalize)
    cap = moe_lib.capacity(flat.shape[0], spec.experts_per_token, e, token_cap)
    buffers, _, kept = moe_lib.dispatch(flat, r, e, cap)  # [E, C, d]; unused slots are zero rows
    counts = jnp.zeros(e, jnp.float32).at[r.expert_ids].add(kept.astype(jnp.float32))
    if which == "out":
      w_gate = None if block.moe.w_gate is None else block.moe.w_gate[...].astype(jnp.float32)
      buffers = moe_lib.gated_ffn(jnp.einsum("ecd,edf->ecf", buffers, block.moe.w_in[...].astype(jnp.float32)),
                             None if w_gate is None else jnp.einsum("ecd,edf->ecf", buffers, w_gate), activation)
    gram = jnp.einsum("eci,ecj->eij", buffers, buffers, precision=jax.lax.Precision.HIGHEST)
    return gram, counts

  gram = counts = None
  for x in xs:
    g, c = batch_stats(block, x)
    gram, counts = (g, c) if gram is None else (gram + g, counts + c)
  return gram * (2.0 / jnp.maximum(counts, 1.0))[:, None, None], counts


def compress_model(model, samples: np.ndarray, *, mode: str = "ternary_gptq", bits: int = 2, damp: float = 0.1,
                   block_size: int = 128, batch_size: int = 8, token_cap: float = 4.0, dead_zone: float = 0.5):
  """Compresses every expert weight of an MoE `model` layer by layer. samples [n, L] int32 calibration windows (run
  in batches of batch_size; a last partial batch is left out). Experts that no calibration token reaches are
  rounded to nearest (identity Hessian) rather than zeroed.

  Returns (params: the model's pure parameter dict with compressed experts, results: {(unit, layer, name):
  ExpertResult}, stats: {"seconds", "tokens_per_expert"})."""
  spec = model.spec
  if not spec.num_experts:
    raise ValueError("QMoE compresses mixture-of-experts models; this model has model.num_experts=0")
  check_dead_zone(dead_zone)
  start = time.perf_counter()
  work = model.unstacked()  # per-unit modules we can update in place
  needs_h = not mode.endswith("rtn")
  b, l = min(batch_size, len(samples)), samples.shape[1]
  positions = jnp.broadcast_to(jnp.arange(l, dtype=jnp.int32), (b, l))
  visibility = Visibility.causal_self(jnp.ones((b, l), jnp.int32))
  embed = nnx.jit(lambda m, ids: m.embed_tokens(ids, positions))
  xs = [embed(work, jnp.asarray(samples[s:s + b])) for s in range(0, len(samples) - b + 1, b)]
  run_block = nnx.jit(lambda block, x: block(x, positions, visibility)[0])
  results, tokens_per_expert = {}, []
  for u, unit in enumerate(work.blocks):
    for j, block in enumerate(unit.layers):
      if block.moe is not None:
        for names, which in ((("w_in", "w_gate"), "in"), (("w_out",), "out")):
          h = None
          if needs_h:
            h, counts = _expert_hessians(block, xs, positions, visibility, token_cap, which)
            # An expert no calibration token reached keeps its weights' information: identity Hessian = RTN.
            eye = jnp.eye(h.shape[-1], dtype=h.dtype)
            h = jnp.where((counts == 0)[:, None, None], eye, h)
            if which == "in":
              tokens_per_expert.append(np.asarray(counts))
          for name in names:
            param = getattr(block.moe, name)
            if param is None:
              continue
            res = compress_experts(param[...], h, mode=mode, bits=bits, damp=damp, block_size=block_size,
                                   dead_zone=dead_zone)
            param[...] = res.weight.astype(param[...].dtype)
            results[(u, j, name)] = res
      xs = [run_block(block, x) for x in xs]
  params = nnx.to_pure_dict(nnx.state(work, nnx.Param))
  params["blocks"] = jax.tree.map(lambda *a: jnp.stack(a), *[params["blocks"][i] for i in range(len(work.blocks))])
  jax.block_until_ready(params)
  stats = {"seconds": time.perf_counter() - start,
           "tokens_per_expert": np.stack(tokens_per_expert).tolist() if tokens_per_expert else None}
  return params, results, stats


# -- lossless coding and sizes -----------------------------------------------------------------------------------------


def count_bits(max_count: int) -> int:
  """Bits of the stored per-row codeword counts: 8 when every row fits in 255 codewords, else 16."""
  return 8 if max_count < 256 else 16


def encode_model(results: dict, code_bits: int | None = None, max_len: int | None = None) -> dict:
  """Codes the ternary symbols of every compressed expert weight with one static dictionary.

  `code_bits` None tries 8..16-bit codewords, and `max_len` None runs of up to 32 and 64 symbols, keeping the
  smallest total. Returns {"dictionary", "encoded": {key: Encoded (rows = experts x outputs, cols = inputs)},
  "symbols", "zeros" (share of 0 symbols), "entropy_bits" (the zeroth-order bound of the codewords),
  "code_bits_per_weight" (codewords only), "bits_per_weight" (everything stored, see `stored_bits`),
  "parts" ({part: bits per weight}), "compressed_bytes"}."""
  rows = {k: np.asarray(r.codes).transpose(0, 2, 1).reshape(-1, r.codes.shape[1]) for k, r in results.items()}
  if not rows or not all(r.ternary for r in results.values()):
    raise ValueError("encode_model needs ternary results (mode ternary_gptq or ternary_rtn)")
  every = np.concatenate([s.reshape(-1) for s in rows.values()])
  n = every.size
  best = None
  for length in ([max_len] if max_len else (32, 64)):
    for bits in ([code_bits] if code_bits else range(8, 17)):
      d = tc.build_dictionary(every, code_bits=bits, max_len=length)
      encoded = {k: tc.encode(s, d) for k, s in rows.items()}
      parts = stored_bits(encoded, d)
      total = sum(parts.values())
      if best is None or total < best["total_bits"]:
        best = {"dictionary": d, "encoded": encoded, "total_bits": total, "parts": parts}
  parts = best["parts"]
  return {"dictionary": best["dictionary"], "encoded": best["encoded"], "symbols": n,
          "code_bits": best["dictionary"].code_bits, "max_len": int(best["dictionary"].entries.shape[1]),
          "zeros": float(np.mean(every == 0)), "entropy_bits": tc.entropy_bits(every),
          "code_bits_per_weight": parts["codewords"] / n, "bits_per_weight": best["total_bits"] / n,
          "parts": {k: v / n for k, v in parts.items()}, "compressed_bytes": best["total_bits"] / 8}


def stored_bits(encoded: dict, d: tc.Dictionary) -> dict:
  """Bits of each stored part of a coded model (as `storage.save_qmoe` writes them): codewords packed at
  d.code_bits, row lengths at `count_bits`, float16 lo and hi per row, the dictionary's 2-bit symbols and uint8
  lengths."""
  codewords = sum(e.codes.size for e in encoded.values()) * d.code_bits
  counts = sum(e.rows * count_bits(int(np.diff(e.offsets).max(initial=0))) for e in encoded.values())
  grids = sum(e.rows * 2 * 8 * np.dtype(GRID_DTYPE).itemsize for e in encoded.values())
  dictionary = d.entries.size * 2 + d.lengths.size * 8
  return {"codewords": codewords, "row_lengths": counts, "grids": grids, "dictionary": dictionary}


def decode_weight(enc: tc.Encoded, d: tc.Dictionary, lo: np.ndarray, hi: np.ndarray, experts: int) -> np.ndarray:
  """Decoded dense weight [E, in, out] float32 of one coded expert stack (lo/hi [E, out])."""
  sym = tc.decode(enc, d).reshape(experts, -1, enc.cols)  # [E, out, in]
  w = np.where(sym == 1, np.asarray(lo)[:, :, None], np.where(sym == 2, np.asarray(hi)[:, :, None], 0.0))
  return w.transpose(0, 2, 1).astype(np.float32)


def expert_param_count(spec) -> int:
  per = spec.embed_dim * spec.expert_mlp_dim * (3 if spec.family == "llama" else 2)
  return (spec.num_layers // spec.moe_every) * spec.num_experts * per


