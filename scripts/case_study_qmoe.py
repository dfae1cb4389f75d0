"""Case study 2 of the survey: QMoE sub-1-bit compression of a mixture-of-experts model, reproduced.

  python -m train --config=configs/moe_small.py --workdir=runs/moe_small      # the MoE to compress
  python -m scripts.case_study_qmoe --workdir=runs/moe_small [--out=DIR] [--calibration_samples=128]

Compresses every expert weight of the trained MoE with ternary GPTQ (QMoE), and for comparison with 2-bit GPTQ and
ternary round-to-nearest; codes the ternary weights with the static dictionary; saves the QMoE model as a workdir
(OUT/qmoe_ternary) that `infer.generate` / `infer.evaluate` load; and reports, in the layout of the QMoE paper's
tables, sizes (bf16 vs compressed, MoE weights and whole model), compression ratios, bits per parameter against the
entropy bound, the natural sparsity of the ternary weights, validation loss per format (dropless routing, the
infer.evaluate stream protocol), compression times and generation speed. Writes OUT/results.md, OUT/results.json
and OUT/qmoe.png (OUT defaults to WORKDIR/case_study_qmoe).
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import matplotlib
from absl import app, flags
from flax import nnx

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the file backend)

from infer import evaluate, generate, loading
from infer.compress import calibrate, qmoe, storage
from model import flops, transformer
from workdir import tokenizer as tokenizer_lib

# SwitchTransformer-c2048 in the QMoE paper (as quoted in the survey issue): 3.2 TB bf16 -> 160 GB, 0.8 bits per
# parameter, about 20x; C4 validation loss 1.18 (bf16) -> 1.26 (ternary).
PAPER = {"bf16_bytes": 3.2e12, "compressed_bytes": 160e9, "bits_per_param": 0.8, "ratio": 20.0,
         "loss_bf16": 1.18, "loss_ternary": 1.26}
FORMATS = (("bf16", None, 16), ("2-bit GPTQ", "gptq", 2), ("ternary GPTQ (QMoE)", "ternary_gptq", 0),
           ("ternary RTN", "ternary_rtn", 0))


def _bf16(params, keep_experts: bool = False):
  """Float32 leaves rounded to bf16 (what the size columns assume); `keep_experts` leaves the expert weights as
  they are (compressed formats: exact grid values)."""
  out = jax.tree.map(lambda a: a.astype(jnp.bfloat16).astype(a.dtype) if a.dtype == jnp.float32 else a, params)
  if keep_experts:
    for i, layer in params["blocks"]["layers"].items():
      for name in qmoe.EXPERT_WEIGHTS:
        if name in layer.get("moe", {}):
          out["blocks"]["layers"][i]["moe"][name] = layer["moe"][name]
  return out


def _tokens_per_second(model, tokenizer, n: int) -> float:
  """Greedy batch-1 generation of n new tokens (no early stop), after a compile run: tokens per second, prefill
  included."""
  prompt = tokenizer_lib.encode_document(tokenizer, "def main(")
  generate.generate(model, [prompt], max_new_tokens=n)  # compile
  start = time.perf_counter()
  (row,) = generate.generate(model, [prompt], max_new_tokens=n)
  return len(row) / (time.perf_counter() - start)


def run(workdir: str, out: str, *, calibration_samples: int = 128, eval_tokens: int = 65536,
        gen_tokens: int = 32, batch_size: int = 8) -> dict:
  config, model, tokenizer, step = loading.load_trained(workdir)
  if not model.spec.num_experts:
    raise ValueError(f"{workdir} is a dense model; train an MoE preset such as configs/moe_small.py")
  spec = dataclasses.replace(model.spec, capacity_factor=0.0)  # score with dropless routing
  float_params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  tokens = evaluate.validation_stream(config, tokenizer, eval_tokens or None)
  seq_len = config.data.seq_len
  samples = calibrate.calibration_samples(config, tokenizer, num_samples=calibration_samples, seq_len=seq_len, seed=0)
  n_total, n_experts = flops.param_count(spec), qmoe.expert_param_count(spec)

  def loss_of(params):  # every format scored with its float parts rounded to bf16, as they are sized
    return evaluate.stream_perplexity(transformer.from_params(spec, _bf16(params, keep_experts=True)), tokens, seq_len,
                                      batch_size)["loss"]

  rows, results_by_mode = [], {}
  for label, mode, bits in FORMATS:
    if mode is None:
      params, seconds = _bf16(float_params), 0.0
      bits_per_param, expert_bytes = 16.0, n_experts * 2
    else:
      params, results, stats = qmoe.compress_model(model, samples, mode=mode, bits=bits or 2, batch_size=batch_size)
      seconds = stats["seconds"]
      results_by_mode[mode] = (params, results, stats)
      if mode.startswith("ternary"):
        enc = qmoe.encode_model(results)
        bits_per_param, expert_bytes = enc["bits_per_weight"], enc["compressed_bytes"]
        results_by_mode[mode] += (enc,)
      else:  # 2-bit codes plus a float32 scale and uint8 zero per expert output row
        grid_bits = sum(r.grid[0].size * 40 for r in results.values())
        bits_per_param = (n_experts * bits + grid_bits) / n_experts
        expert_bytes = n_experts * bits_per_param / 8
    whole = (n_total - n_experts) * 2 + expert_bytes
    row = {"format": label, "loss": loss_of(params), "bits_per_expert_param": bits_per_param,
           "expert_bytes": expert_bytes, "model_bytes": whole, "expert_ratio": n_experts * 2 / expert_bytes,
           "model_ratio": n_total * 2 / whole, "compression_s": seconds}
    rows.append(row)
    print(f"{label:22s} loss {row['loss']:.4f}  {bits_per_param:6.3f} bits/expert param  "
          f"experts {row['expert_ratio']:5.1f}x  model {row['model_ratio']:5.2f}x  {seconds:6.1f} s", flush=True)

  no_experts = jax.tree.map(lambda x: x, float_params)  # the ablation: how much the experts matter at all
  for layer in no_experts["blocks"]["layers"].values():
    if "moe" in layer:
      layer["moe"]["w_out"] = jnp.zeros_like(layer["moe"]["w_out"])
  loss_without_experts = loss_of(no_experts)
  params, results, stats, enc = results_by_mode["ternary_gptq"]
  qdir = os.path.join(out, "qmoe_ternary")
  label_summary = {"sparsity": enc["zeros"], "bits_per_weight": enc["bits_per_weight"],
                   "compressed_params": n_experts, "scope": "expert weights (attention, dense MLPs, routers and "
                                                            "embeddings stay float)"}
  storage.save_qmoe(qdir, config=config, source_workdir=workdir, step=step, params=params, results=results,
                    encoding=enc, metadata={"label": "QMoE ternary GPTQ", "method": {"method": "qmoe"},
                                            "time_s": stats["seconds"], "summary": label_summary})
  _, reloaded, _, _ = loading.load_trained(qdir)
  reloaded_params = nnx.to_pure_dict(nnx.state(reloaded, nnx.Param))
  same = all(bool(jnp.array_equal(a, b)) for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(reloaded_params)))
  report = {"workdir": os.path.abspath(workdir), "step": step, "params": n_total, "expert_params": n_experts,
            "experts": spec.num_experts, "eval_tokens": len(tokens), "calibration_samples": calibration_samples,
            "rows": rows, "loss_without_experts": loss_without_experts, "natural_sparsity": enc["zeros"], "entropy_bits": enc["entropy_bits"],
            "code_bits_per_weight": enc["code_bits_per_weight"], "code_bits": enc["code_bits"], "dictionary_entries": int(enc["dictionary"].entries.shape[0]),
            "tokens_per_expert": stats["tokens_per_expert"], "qmoe_workdir": qdir, "reloaded_bit_exact": same,
            "paper": PAPER}
  if gen_tokens:
    report["generation_tokens_per_s"] = {
        "bf16-rounded float": _tokens_per_second(
            transformer.from_params(spec, _bf16(float_params)).unstacked(), tokenizer, gen_tokens),
        "QMoE, decoded at load": _tokens_per_second(
            transformer.from_params(spec, reloaded_params).unstacked(), tokenizer, gen_tokens)}
    # the fused path decodes every expert row inside the Pallas kernel at each step (interpret mode on CPU)
    _, fused, _, _ = loading.load_trained(qdir, matmul_impl="pallas")
    report["generation_tokens_per_s"][f"QMoE, fused decode kernel ({jax.default_backend()}"
                                      f"{', interpret mode' if jax.default_backend() == 'cpu' else ''})"] = (
                                          _tokens_per_second(fused, tokenizer, gen_tokens))
  os.makedirs(out, exist_ok=True)
  with open(os.path.join(out, "results.json"), "w", encoding="utf-8") as f:
    json.dump(report, f, indent=2)
  with open(os.path.join(out, "results.md"), "w", encoding="utf-8") as f:
    f.write(markdown(report))
  plot(report, os.path.join(out, "qmoe.png"))
  return report


def markdown(r: dict) -> str:
  mb = lambda b: f"{b / 1e6:.2f} MB"  # noqa: E731
  bf16, qm = r["rows"][0], r["rows"][2]
  lines = [f"QMoE on `{r['workdir']}` (step {r['step']}): {r['params']:,} parameters, {r['expert_params']:,} in "
           f"{r['experts']}-expert MoE layers; loss = validation NLL per token over {r['eval_tokens']:,} tokens "
           f"(dropless routing); {r['calibration_samples']} calibration windows.", "",
           "| | bf16 size | QMoE size | ratio | bits per expert parameter | loss bf16 | loss QMoE |",
           "|---|---|---|---|---|---|---|",
           f"| MoE weights (ours) | {mb(bf16['expert_bytes'])} | {mb(qm['expert_bytes'])} | {qm['expert_ratio']:.1f}x | "
           f"{qm['bits_per_expert_param']:.3f} | {bf16['loss']:.4f} | {qm['loss']:.4f} |",
           f"| whole model (ours) | {mb(bf16['model_bytes'])} | {mb(qm['model_bytes'])} | {qm['model_ratio']:.2f}x | | | |",
           "| SwitchTransformer-c2048 (paper) | 3.2 TB | 160 GB | 20x | 0.8 | 1.18 | 1.26 |", "",
           f"Natural sparsity of the ternary experts: {r['natural_sparsity']:.1%} zeros; entropy bound "
           f"{r['entropy_bits']:.3f} bits per weight; dictionary codewords {r['code_bits_per_weight']:.3f} bits per "
           f"weight ({r['dictionary_entries']:,} entries of {r['code_bits']}-bit codewords), "
           f"{qm['bits_per_expert_param']:.3f} with row offsets, per-row grids and the dictionary itself. "
           f"Reloaded checkpoint bit-exact: {r['reloaded_bit_exact']}. With every expert's output zeroed the loss is "
           f"{r['loss_without_experts']:.4f}: the experts are worth {r['loss_without_experts'] - bf16['loss']:.4f} "
           "nats, the scale the deltas below compare to.", "",
           "| format | loss | delta vs bf16 | bits per expert parameter | MoE ratio | model ratio | compression time (s) |",
           "|---|---|---|---|---|---|---|"]
  for row in r["rows"]:
    lines.append(f"| {row['format']} | {row['loss']:.4f} | {row['loss'] - bf16['loss']:+.4f} | "
                 f"{row['bits_per_expert_param']:.3f} | {row['expert_ratio']:.1f}x | {row['model_ratio']:.2f}x | "
                 f"{row['compression_s']:.1f} |")
  if "generation_tokens_per_s" in r:
    lines += ["", f"| generation (batch 1, greedy, {jax.default_backend()}) | tokens/s |", "|---|---|"]
    lines += [f"| {k} | {v:.1f} |" for k, v in r["generation_tokens_per_s"].items()]
  return "\n".join(lines) + "\n"


def plot(r: dict, path: str) -> None:
  fig, ax = plt.subplots(figsize=(6.5, 4))
  rows = r["rows"]
  bars = ax.bar([x["format"] for x in rows], [x["loss"] for x in rows], color=["gray", "tab:blue", "tab:orange",
                                                                                 "tab:red"])
  for bar, row in zip(bars, rows):
    ax.annotate(f"{row['bits_per_expert_param']:.2f} bits", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                ha="center", va="bottom", fontsize=8)
  low = min(x["loss"] for x in rows)
  ax.set_ylim(low * 0.95, max(x["loss"] for x in rows) * 1.02)
  ax.set_ylabel("validation loss (nats per token)")
  ax.set_title("QMoE: expert compression vs validation loss")
  plt.setp(ax.get_xticklabels(), rotation=12, fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def _define_flags():
  """Flags exist only when run as a script, so tests can import several scripts."""
  flags.DEFINE_string("workdir", None, "Trained float MoE workdir.", required=True)
  flags.DEFINE_string("out", "", "Output directory (default WORKDIR/case_study_qmoe).")
  flags.DEFINE_integer("calibration_samples", 128, "Calibration windows.")
  flags.DEFINE_integer("eval_tokens", 65536, "Validation tokens scored per format (0: all).")
  flags.DEFINE_integer("gen_tokens", 32, "Tokens generated for the speed comparison (0 skips).")


def main(argv):
  del argv
  f = flags.FLAGS
  out = f.out or os.path.join(f.workdir, "case_study_qmoe")
  try:
    report = run(f.workdir, out, calibration_samples=f.calibration_samples, eval_tokens=f.eval_tokens,
                 gen_tokens=f.gen_tokens)
  except (FileNotFoundError, FileExistsError, ValueError) as e:
    sys.exit(f"error: {e}")
  print(markdown(report))
  print(f"written to {out}/results.md, results.json, qmoe.png; the QMoE model is the workdir {report['qmoe_workdir']}")


if __name__ == "__main__":
  _define_flags()
  app.run(main)
