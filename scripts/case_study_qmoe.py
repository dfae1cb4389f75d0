"""Case study 2 of the survey: QMoE sub-1-bit compression of a mixture-of-experts model, reproduced.

  python -m train --config=configs/moe_small.py --workdir=runs/moe_small      # the MoE to compress
  python -m scripts.case_study_qmoe --workdir=runs/moe_small [--out=DIR] [--calibration_samples=128]

Compresses every expert weight of the trained MoE with ternary GPTQ (QMoE), and for comparison with 2-bit GPTQ and
ternary round-to-nearest; tunes the ternary grid's dead zone (the share of lo/hi below which a weight rounds to 0)
on calibration data: the widest candidate whose loss on tuning windows of the training split (drawn apart from the
GPTQ calibration windows) stays within --max_loss_increase of the float model's, which buys zeros and so bits; codes
the ternary weights with the static dictionary; saves that QMoE model as a workdir (OUT/qmoe_ternary) that
`infer.generate` / `infer.evaluate` load; and reports, in the layout of the QMoE paper's tables, sizes (bf16 vs
compressed, MoE weights and whole model), compression ratios, bits per parameter (each stored part, read back from
the saved checkpoint) against the entropy bound, the natural sparsity of the ternary weights, validation loss per
format (dropless routing, the infer.evaluate stream protocol), compression times and generation speed. Writes
OUT/results.md, OUT/results.json and OUT/qmoe.png (OUT defaults to WORKDIR/case_study_qmoe).
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
TUNED = "ternary GPTQ (QMoE), tuned dead zone"


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


def tune_dead_zone(model, samples, tuning_tokens, dead_zones, max_loss_increase: float,
                   batch_size: int, float_loss: float, score) -> tuple[float, list[dict]]:
  """The widest of `dead_zones` whose ternary GPTQ model's loss on `tuning_tokens` stays within
  (1 + max_loss_increase) times `float_loss` (the narrowest candidate when none does), and a row per candidate:
  {"dead_zone", "zeros", "entropy_bits", "bits_per_weight", "tuning_loss", "within_budget"}."""
  table = []
  for dz in sorted(dead_zones):
    params, results, _ = qmoe.compress_model(model, samples, dead_zone=dz, batch_size=batch_size)
    enc = qmoe.encode_model(results, code_bits=12, max_len=64)  # a fixed code for ranking; the final one searches
    loss = score(params, tuning_tokens)
    table.append({"dead_zone": dz, "zeros": enc["zeros"], "entropy_bits": enc["entropy_bits"],
                  "bits_per_weight": enc["bits_per_weight"], "tuning_loss": loss,
                  "within_budget": loss <= float_loss * (1 + max_loss_increase)})
    print(f"dead zone {dz:.2f}: {enc['zeros']:.1%} zeros, {enc['bits_per_weight']:.3f} bits per weight, tuning "
          f"loss {loss:.4f} ({loss / float_loss - 1:+.2%})", flush=True)
  ok = [row for row in table if row["within_budget"]]
  return (max(ok, key=lambda r: r["dead_zone"]) if ok else table[0])["dead_zone"], table


def run(workdir: str, out: str, *, calibration_samples: int = 128, eval_tokens: int = 65536,
        gen_tokens: int = 32, batch_size: int = 8, dead_zones=(0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95),
        max_loss_increase: float = 0.005, tuning_tokens: int = 32768) -> dict:
  config, model, tokenizer, step = loading.load_trained(workdir)
  if not model.spec.num_experts:
    raise ValueError(f"{workdir} is a dense model; train an MoE preset such as configs/moe_small.py")
  for dz in dead_zones:
    qmoe.check_dead_zone(dz)
  spec = dataclasses.replace(model.spec, capacity_factor=0.0)  # score with dropless routing
  float_params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  tokens = evaluate.validation_stream(config, tokenizer, eval_tokens or None)
  seq_len = config.data.seq_len
  samples = calibrate.calibration_samples(config, tokenizer, num_samples=calibration_samples, seq_len=seq_len, seed=0)
  tuning = calibrate.calibration_samples(config, tokenizer, num_samples=max(1, tuning_tokens // seq_len),
                                         seq_len=seq_len, seed=1).reshape(-1)
  n_total, n_experts = flops.param_count(spec), qmoe.expert_param_count(spec)

  def loss_of(params, stream=tokens):  # every format scored with its float parts rounded to bf16, as they are sized
    return evaluate.stream_perplexity(transformer.from_params(spec, _bf16(params, keep_experts=True)), stream, seq_len,
                                      batch_size)["loss"]

  dead_zone, tuning_table = tune_dead_zone(model, samples, tuning, dead_zones, max_loss_increase,
                                           batch_size, loss_of(float_params, tuning), loss_of)
  rows, results_by_mode = [], {}
  for label, mode, bits in FORMATS + ((TUNED, "ternary_gptq", 0),):
    dz = dead_zone if label == TUNED else 0.5
    if mode is None:
      params, seconds = _bf16(float_params), 0.0
      bits_per_param, expert_bytes = 16.0, n_experts * 2
    else:
      params, results, stats = qmoe.compress_model(model, samples, mode=mode, bits=bits or 2, batch_size=batch_size,
                                                   dead_zone=dz)
      seconds = stats["seconds"]
      results_by_mode[label] = (params, results, stats)
      if mode.startswith("ternary"):
        enc = qmoe.encode_model(results)
        bits_per_param, expert_bytes = enc["bits_per_weight"], enc["compressed_bytes"]
        results_by_mode[label] += (enc,)
      else:  # 2-bit codes plus a float32 scale and uint8 zero per expert output row
        grid_bits = sum(r.grid[0].size * 40 for r in results.values())
        bits_per_param = (n_experts * bits + grid_bits) / n_experts
        expert_bytes = n_experts * bits_per_param / 8
    whole = (n_total - n_experts) * 2 + expert_bytes
    row = {"format": label, "dead_zone": dz if mode and mode.startswith("ternary") else None, "loss": loss_of(params),
           "bits_per_expert_param": bits_per_param, "expert_bytes": expert_bytes, "model_bytes": whole,
           "expert_ratio": n_experts * 2 / expert_bytes, "model_ratio": n_total * 2 / whole, "compression_s": seconds}
    if mode and mode.startswith("ternary"):
      row.update(zeros=enc["zeros"], entropy_bits=enc["entropy_bits"], parts=enc["parts"])
    rows.append(row)
    print(f"{label:38s} loss {row['loss']:.4f}  {bits_per_param:6.3f} bits/expert param  "
          f"experts {row['expert_ratio']:5.1f}x  model {row['model_ratio']:5.2f}x  {seconds:6.1f} s", flush=True)

  no_experts = jax.tree.map(lambda x: x, float_params)  # the ablation: how much the experts matter at all
  for layer in no_experts["blocks"]["layers"].values():
    if "moe" in layer:
      layer["moe"]["w_out"] = jnp.zeros_like(layer["moe"]["w_out"])
  loss_without_experts = loss_of(no_experts)
  params, results, stats, enc = results_by_mode[TUNED]
  qdir = os.path.join(out, "qmoe_ternary")
  label_summary = {"sparsity": enc["zeros"], "bits_per_weight": enc["bits_per_weight"], "dead_zone": dead_zone,
                   "compressed_params": n_experts, "scope": "expert weights (attention, dense MLPs, routers and "
                                                            "embeddings stay float)"}
  storage.save_qmoe(qdir, config=config, source_workdir=workdir, step=step, params=params, results=results,
                    encoding=enc, metadata={"label": "QMoE ternary GPTQ", "method": {"method": "qmoe",
                                                                                     "dead_zone": dead_zone},
                                            "time_s": stats["seconds"], "summary": label_summary})
  _, sizes, dictionary_bytes = stored_size(qdir)
  stored_bits_per_param = 8 * (sum(sum(v.values()) for v in sizes.values()) + dictionary_bytes) / n_experts
  _, reloaded, _, _ = loading.load_trained(qdir)
  reloaded_params = nnx.to_pure_dict(nnx.state(reloaded, nnx.Param))
  same = all(bool(jnp.array_equal(a, b)) for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(reloaded_params)))
  report = {"workdir": os.path.abspath(workdir), "step": step, "params": n_total, "expert_params": n_experts,
            "experts": spec.num_experts, "eval_tokens": len(tokens), "calibration_samples": calibration_samples,
            "rows": rows, "loss_without_experts": loss_without_experts, "dead_zone": dead_zone,
            "dead_zone_tuning": tuning_table, "max_loss_increase": max_loss_increase, "tuning_tokens": len(tuning),
            "natural_sparsity": enc["zeros"], "entropy_bits": enc["entropy_bits"],
            "code_bits_per_weight": enc["code_bits_per_weight"], "code_bits": enc["code_bits"],
            "max_len": enc["max_len"], "parts": enc["parts"],
            "dictionary_entries": int(enc["dictionary"].entries.shape[0]),
            "stored_bits_per_expert_param": stored_bits_per_param,
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


def stored_size(qdir: str) -> tuple[dict, dict, int]:
  """(coded arrays, {weight: {array: bytes}}, dictionary bytes) of a saved QMoE workdir, read back from its
  checkpoint."""
  coded, _, sizes, dictionary_bytes, _, _ = storage.read_qmoe(qdir)
  return coded, sizes, dictionary_bytes


def markdown(r: dict) -> str:
  mb = lambda b: f"{b / 1e6:.2f} MB"  # noqa: E731
  bf16, qm = r["rows"][0], next(row for row in r["rows"] if row["format"] == TUNED)
  lines = [f"QMoE on `{r['workdir']}` (step {r['step']}): {r['params']:,} parameters, {r['expert_params']:,} in "
           f"{r['experts']}-expert MoE layers; loss = validation NLL per token over {r['eval_tokens']:,} tokens "
           f"(dropless routing); {r['calibration_samples']} calibration windows.", "",
           "| | bf16 size | QMoE size | ratio | bits per expert parameter | loss bf16 | loss QMoE |",
           "|---|---|---|---|---|---|---|",
           f"| MoE weights (ours) | {mb(bf16['expert_bytes'])} | {mb(qm['expert_bytes'])} | {qm['expert_ratio']:.1f}x | "
           f"{qm['bits_per_expert_param']:.3f} | {bf16['loss']:.4f} | {qm['loss']:.4f} |",
           f"| whole model (ours) | {mb(bf16['model_bytes'])} | {mb(qm['model_bytes'])} | {qm['model_ratio']:.2f}x | | | |",
           "| SwitchTransformer-c2048 (paper) | 3.2 TB | 160 GB | 20x | 0.8 | 1.18 | 1.26 |", "",
           f"Dead zone {r['dead_zone']:g} (tuned: the widest whose loss on {r['tuning_tokens']:,} training-split tuning "
           f"tokens stays within +{r['max_loss_increase']:.1%} of the float model's). Natural sparsity of the ternary "
           f"experts: {r['natural_sparsity']:.1%} zeros; entropy bound {r['entropy_bits']:.3f} bits per weight; "
           f"dictionary codewords {r['code_bits_per_weight']:.3f} bits per weight ({r['dictionary_entries']:,} "
           f"entries of up to {r['max_len']} symbols, {r['code_bits']}-bit codewords); everything stored "
           f"{qm['bits_per_expert_param']:.3f} ("
           + ", ".join(f"{k.replace('_', ' ')} {v:.3f}" for k, v in r["parts"].items())
           + f"); read back from the saved checkpoint: {r['stored_bits_per_expert_param']:.3f}. "
           f"Reloaded checkpoint bit-exact: {r['reloaded_bit_exact']}. With every expert's output zeroed the loss is "
           f"{r['loss_without_experts']:.4f}: the experts are worth {r['loss_without_experts'] - bf16['loss']:.4f} "
           "nats, the scale the deltas below compare to.", "",
           "| format | loss | delta vs bf16 | bits per expert parameter | MoE ratio | model ratio | compression time (s) |",
           "|---|---|---|---|---|---|---|"]
  for row in r["rows"]:
    label = row["format"] + (f" ({row['dead_zone']:g})" if row["format"] == TUNED else "")
    lines.append(f"| {label} | {row['loss']:.4f} | {row['loss'] - bf16['loss']:+.4f} "
                 f"({(row['loss'] - bf16['loss']) / bf16['loss']:+.2%}) | "
                 f"{row['bits_per_expert_param']:.3f} | {row['expert_ratio']:.1f}x | {row['model_ratio']:.2f}x | "
                 f"{row['compression_s']:.1f} |")
  lines += ["", "| dead zone | zeros | entropy bound (bits) | bits per expert parameter (12-bit code) | tuning loss | "
            "within budget |", "|---|---|---|---|---|---|"]
  lines += [f"| {t['dead_zone']:g} | {t['zeros']:.1%} | {t['entropy_bits']:.3f} | {t['bits_per_weight']:.3f} | "
            f"{t['tuning_loss']:.4f} | {'yes' if t['within_budget'] else 'no'} |" for t in r["dead_zone_tuning"]]
  if "generation_tokens_per_s" in r:
    lines += ["", f"| generation (batch 1, greedy, {jax.default_backend()}) | tokens/s |", "|---|---|"]
    lines += [f"| {k} | {v:.1f} |" for k, v in r["generation_tokens_per_s"].items()]
  return "\n".join(lines) + "\n"


def plot(r: dict, path: str) -> None:
  fig, ax = plt.subplots(figsize=(6.5, 4))
  rows = r["rows"]
  bars = ax.bar([x["format"] for x in rows], [x["loss"] for x in rows], color=["gray", "tab:blue", "tab:orange",
                                                                                 "tab:red", "tab:green"])
  for bar, row in zip(bars, rows):
    ax.annotate(f"{row['bits_per_expert_param']:.2f} bits", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                ha="center", va="bottom", fontsize=8)
  low = min(x["loss"] for x in rows)
  ax.set_ylim(low * 0.95, max(x["loss"] for x in rows) * 1.02)
  ax.set_ylabel("validation loss (nats per token)")
  ax.set_title("QMoE: expert compression vs validation loss")
  ax.set_xticks(range(len(rows)), [x["format"].replace(", tuned", ",\ntuned") for x in rows])
  plt.setp(ax.get_xticklabels(), rotation=12, fontsize=7)
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
  flags.DEFINE_list("dead_zones", ["0.5", "0.6", "0.7", "0.8", "0.85", "0.9", "0.95"],
                    "Dead-zone candidates, each in [0.5, 1) (0.5: nearest grid point; one value: no tuning).")
  flags.DEFINE_float("max_loss_increase", 0.005, "Relative tuning-loss budget of the dead zone.")
  flags.DEFINE_integer("tuning_tokens", 32768, "Training-split tokens (apart from the calibration windows) the dead "
                       "zone is tuned on.")


def main(argv):
  del argv
  f = flags.FLAGS
  out = f.out or os.path.join(f.workdir, "case_study_qmoe")
  try:
    report = run(f.workdir, out, calibration_samples=f.calibration_samples, eval_tokens=f.eval_tokens,
                 gen_tokens=f.gen_tokens, dead_zones=[float(x) for x in f.dead_zones],
                 max_loss_increase=f.max_loss_increase, tuning_tokens=f.tuning_tokens)
  except (FileNotFoundError, FileExistsError, ValueError) as e:
    sys.exit(f"error: {e}")
  print(markdown(report))
  print(f"written to {out}/results.md, results.json, qmoe.png; the QMoE model is the workdir {report['qmoe_workdir']}")


if __name__ == "__main__":
  _define_flags()
  app.run(main)
