"""Case study 1 of the survey: SparseGPT one-shot pruning and GPTQ quantization, reproduced on our model.

  python -m scripts.case_study_sparsegpt --workdir=runs/case_study [--out=DIR] [--calibration_samples=128]
  python -m scripts.case_study_sparsegpt --from_hf=opt-125m --workdir=runs/opt125m --data=files:wikitext2 --seq_len=2048

On the float model of WORKDIR (trained by `python -m train`, or imported first from the Hugging Face directory
--from_hf), runs the rows of the SparseGPT / GPTQ / Wanda papers' tables: dense; magnitude, Wanda and SparseGPT at 50%,
4:8 and 2:4; SparseGPT 50% + 4-bit; GPTQ (plain, and grouped with act-order) against round-to-nearest (plain and
grouped) at 4, 3 and 2 bits; then uniform against outlier-weighted (OWL) and sensitivity-weighted layer sparsities
for the three pruning methods at 60% and 70%; then perplexity against unstructured sparsity from 10% to 80% per pruning method.
Perplexity uses `infer.evaluate`'s protocol (validation stream, non-overlapping windows of data.seq_len); every row
shares one set of calibration windows. Writes OUT/results.md, OUT/results.json and OUT/sparsity_curve.png (OUT
defaults to WORKDIR/case_study_sparsegpt) and prints the tables.
"""

from __future__ import annotations

import json
import os
import sys
import time

import jax
import matplotlib
from absl import app, flags
from flax import nnx

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the file backend)

from configs import compress as compress_config
from infer import evaluate, loading
from infer.compress import calibrate
from infer.compress import pipeline as compress
from scripts import convert
from workdir import layout

# The papers' OPT-125M numbers (WikiText2 perplexity): SparseGPT (Frantar and Alistarh, 2023) Table 1 and
# GPTQ (Frantar et al., 2023) Table 3, as quoted in the issue.
PAPER_OPT125M = {"dense": 27.66, "magnitude 50%": 193.0, "sparsegpt 50%": 36.85, "gptq 4-bit": 31.12,
                 "rtn 4-bit": 37.28}
PRUNING = ("magnitude", "wanda", "sparsegpt")


def rows(group_size: int = 64) -> list[dict | None]:
  """The main table's rows as configs/compress.py overrides (None: the dense model)."""
  table = [None]
  for method in PRUNING:
    table += [dict(method=method, sparsity=0.5), dict(method=method, prune_n=4, prune_m=8),
              dict(method=method, prune_n=2, prune_m=4)]
  table += [dict(method="sparsegpt", sparsity=0.5, bits=4)]
  for bits in (4, 3, 2):
    table += [dict(method="rtn", bits=bits), dict(method="gptq", bits=bits)]
    if group_size:
      table += [dict(method="rtn", bits=bits, group_size=group_size),
                dict(method="gptq", bits=bits, group_size=group_size, act_order=True)]
  return table


def layer_rows(sparsities, threshold: float, spread: float) -> list[dict]:
  """Uniform against OWL and sensitivity layer sparsities, for every pruning method at each sparsity."""
  return [dict(method=method, sparsity=float(s), layer_sparsity=layer, owl_threshold=threshold, sparsity_spread=spread)
          for s in sparsities for method in PRUNING for layer in compress_config.LAYER_SPARSITIES]


def _config(overrides: dict):
  c = compress_config.get_config()
  c.update(overrides)
  return compress_config.validate(c)


def run(workdir: str, out: str, *, calibration_samples: int = 128, eval_tokens: int = 0,
        only: list[str] | None = None, curve: list[float] = (), data: str = "", seq_len: int = 0, group_size: int = 64,
        layer_sparsities: list[float] = (0.6, 0.7), owl_threshold: float = 5.0, sparsity_spread: float = 0.08) -> dict:
  """Runs the case study; returns {"rows", "layer_sparsity", "curve", ...} as also written to out/results.json. `only` keeps
  the rows of the two tables with these labels (the curve has every method at each of `curve`'s sparsities)."""
  config, model, tokenizer, step = loading.load_trained(workdir)
  if model.spec.quant != "none":
    raise ValueError(f"{workdir} holds an int8 model (quant={model.spec.quant}); use the float workdir")
  if data:
    config.data.source = data
  if seq_len:
    if not 1 < seq_len <= model.spec.max_len:
      raise ValueError(f"--seq_len={seq_len} must be in [2, model.max_len={model.spec.max_len}]")
    config.data.seq_len = seq_len
  seq_len = config.data.seq_len
  tokens = evaluate.validation_stream(config, tokenizer, eval_tokens or None)
  window_nll = evaluate.make_window_nll(model)
  base = compress_config.get_config()
  start = time.perf_counter()
  samples = calibrate.calibration_samples(config, tokenizer, num_samples=calibration_samples,
                                          seq_len=base.calibration_len or seq_len, seed=base.calibration_seed)
  sampling_s = time.perf_counter() - start
  dense_ppl = evaluate.stream_perplexity(model, tokens, seq_len, 8, window_nll)["ppl"]

  def row(overrides: dict | None, filtered: bool = True) -> dict | None:
    label = "dense" if overrides is None else compress_config.describe(_config(overrides))
    if filtered and only and label not in only:
      return None
    if overrides is None:
      r = {"label": label, "sparsity": 0.0, "bits_per_weight": 32.0, "ppl": dense_ppl, "time_s": 0.0}
    else:
      c = _config(overrides)
      result = compress.compress_workdir(config, model, tokenizer, step, c, source_workdir=workdir, samples=samples)
      m = result["metadata"]
      r = {"label": label, "method": c.method, "sparsity": m["summary"]["sparsity"],
           "bits_per_weight": m["summary"]["bits_per_weight"],
           "ppl": evaluate.stream_perplexity(result["model"], tokens, seq_len, 8, window_nll)["ppl"],
           "time_s": m["time_s"], "block_sparsity_targets": m["block_sparsity_targets"]}
    r["ppl_vs_dense"] = r["ppl"] / dense_ppl
    r["paper_opt125m"] = PAPER_OPT125M.get(label)
    print(f"{label:32s} ppl {r['ppl']:10.2f}  ({r['ppl_vs_dense']:.3f}x dense)  {r['time_s']:6.1f} s", flush=True)
    return r

  results = [r for r in map(row, rows(group_size)) if r]
  layered = [r for r in map(row, layer_rows(layer_sparsities, owl_threshold, sparsity_spread)) if r]
  curve_points = {method: [] for method in PRUNING}
  for sparsity in curve:
    for method in PRUNING:
      r = row(dict(method=method, sparsity=float(sparsity)), filtered=False)
      curve_points[method].append({"sparsity": float(sparsity), "ppl": r["ppl"], "time_s": r["time_s"]})
  report = {"workdir": os.path.abspath(workdir), "step": step, "data": config.data.source, "dense_ppl": dense_ppl,
            "eval_tokens": len(tokens), "seq_len": seq_len, "calibration_samples": calibration_samples,
            "calibration_sampling_s": sampling_s, "group_size": group_size,
            "owl_threshold": owl_threshold, "sparsity_spread": sparsity_spread,
            "params": int(sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))),
            "rows": results, "layer_sparsity": layered, "curve": curve_points if curve else None}
  os.makedirs(out, exist_ok=True)
  with open(os.path.join(out, "results.json"), "w", encoding="utf-8") as f:
    json.dump(report, f, indent=2)
  with open(os.path.join(out, "results.md"), "w", encoding="utf-8") as f:
    f.write(markdown(report))
  if curve:
    plot(curve_points, dense_ppl, os.path.join(out, "sparsity_curve.png"))
  return report


def markdown(report: dict) -> str:
  """The rows in the layout of the papers' tables."""
  lines = [f"Validation perplexity of `{report['workdir']}` (step {report['step']}, {report['params']:,} parameters) "
           f"on `{report['data']}`, {report['eval_tokens']:,} tokens in windows of {report['seq_len']}; "
           f"{report['calibration_samples']} calibration windows.", "",
           "| method | sparsity | bits/weight | perplexity | vs dense | time (s) | paper OPT-125M |",
           "|---|---|---|---|---|---|---|"]
  for r in report["rows"]:
    paper = f"{r['paper_opt125m']:.2f}" if r["paper_opt125m"] else "-"
    lines.append(f"| {r['label']} | {r['sparsity']:.1%} | {r['bits_per_weight']:.2f} | {r['ppl']:.2f} | "
                 f"{r['ppl_vs_dense']:.3f}x | {r['time_s']:.1f} | {paper} |")
  if report.get("layer_sparsity"):
    by_label = {r["label"]: r for r in report["layer_sparsity"]}
    lines += ["", "Layer sparsities: uniform, outlier-weighted (OWL, M = "
              f"{report['owl_threshold']:g}) and sensitivity-weighted, spread {report['sparsity_spread']:g}: "
              "perplexity (vs dense), and the block sparsities each chose.", "",
              "| method | sparsity | uniform | OWL | sensitivity | OWL blocks | sensitivity blocks |",
              "|---|---|---|---|---|---|---|"]
    for r in report["layer_sparsity"]:
      if r["block_sparsity_targets"] is not None:  # one line per uniform row
        continue
      cells, blocks = [], []
      for layer in ("", " owl", " sensitivity"):
        x = by_label.get(r["label"] + layer)
        cells.append(f"{x['ppl']:.2f} ({x['ppl_vs_dense']:.2f}x)" if x else "-")
        if layer:
          blocks.append(", ".join(f"{v:.2f}" for v in (x or {}).get("block_sparsity_targets") or []) or "-")
      lines.append(f"| {r['method']} | {r['sparsity']:.1%} | " + " | ".join(cells + blocks) + " |")
  if report["curve"]:
    methods = list(report["curve"])
    lines += ["", "| sparsity | " + " | ".join(methods) + " |", "|---" * (len(methods) + 1) + "|"]
    for points in zip(*report["curve"].values()):
      lines.append(f"| {points[0]['sparsity']:.0%} | " + " | ".join(f"{p['ppl']:.2f}" for p in points) + " |")
  return "\n".join(lines) + "\n"


def plot(curve: dict, dense_ppl: float, path: str) -> None:
  fig, ax = plt.subplots(figsize=(6, 4))
  for method, points in curve.items():
    ax.plot([100 * p["sparsity"] for p in points], [p["ppl"] for p in points], marker="o", label=method)
  ax.axhline(dense_ppl, color="gray", linestyle="--", label="dense")
  ax.set_yscale("log")
  ax.set_xlabel("unstructured sparsity of every block linear layer (%)")
  ax.set_ylabel("validation perplexity")
  ax.set_title("One-shot pruning: magnitude, Wanda, SparseGPT")
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def _define_flags():
  """Flags exist only when run as a script, so tests can import several scripts."""
  flags.DEFINE_string("workdir", None, "Trained float workdir (with --from_hf: where the import is written).",
                      required=True)
  flags.DEFINE_string("from_hf", "", "A Hugging Face model directory (e.g. opt-125m) imported into --workdir first.")
  flags.DEFINE_string("out", "", "Output directory (default WORKDIR/case_study_sparsegpt).")
  flags.DEFINE_integer("calibration_samples", 128, "Calibration windows (the papers use 128).")
  flags.DEFINE_integer("eval_tokens", 0, "Validation tokens scored per row (0: the whole split).")
  flags.DEFINE_string("data", "", "Data source for calibration (train split) and scoring (validation split); "
                      "default: the run's data.source, e.g. files:wikitext2 (its train/ and test/ folders are the splits).")
  flags.DEFINE_integer("seq_len", 0, "Tokens per calibration and scoring window (0: the run's data.seq_len; the "
                       "papers use 2048 for OPT).")
  flags.DEFINE_list("rows", [], "Only these row labels (default: all), e.g. 'dense,sparsegpt 50%'.")
  flags.DEFINE_integer("group_size", 64, "Inputs per quantization group of the grouped GPTQ/RTN rows (0: none).")
  flags.DEFINE_list("layer_sparsities", ["0.6", "0.7"], "Sparsities of the uniform / OWL / sensitivity table "
                    "(empty: none).")
  flags.DEFINE_float("owl_threshold", 5.0, "OWL's outlier threshold M.")
  flags.DEFINE_float("sparsity_spread", 0.08, "OWL's lambda: how far block sparsities spread (owl, sensitivity).")
  flags.DEFINE_list("curve", ["0.1", "0.2", "0.3", "0.4", "0.5", "0.6", "0.7", "0.8"],
                    "Sparsities of the magnitude / Wanda / SparseGPT curve (empty: no curve).")


def main(argv):
  del argv
  f = flags.FLAGS
  out = f.out or os.path.join(f.workdir, "case_study_sparsegpt")
  try:
    if f.from_hf and not os.path.isdir(layout.checkpoint_dir(f.workdir)):
      convert.import_hf(f.from_hf, f.workdir)
    report = run(f.workdir, out, calibration_samples=f.calibration_samples, eval_tokens=f.eval_tokens, only=f.rows,
                 curve=[float(s) for s in f.curve], data=f.data, seq_len=f.seq_len, group_size=f.group_size,
                 layer_sparsities=[float(s) for s in f.layer_sparsities], owl_threshold=f.owl_threshold,
                 sparsity_spread=f.sparsity_spread)
  except (FileNotFoundError, FileExistsError, ValueError) as e:
    sys.exit(f"error: {e}")
  print(markdown(report))
  print(f"written to {out}/results.md, results.json" + (", sparsity_curve.png" if report["curve"] else ""))


if __name__ == "__main__":
  _define_flags()
  app.run(main)
