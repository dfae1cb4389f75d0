"""Case study 1 of the survey: SparseGPT one-shot pruning and GPTQ quantization, reproduced on our model.

  python -m scripts.case_study_sparsegpt --workdir=runs/default [--out=DIR] [--calibration_samples=128]

On the float model of WORKDIR (trained by `python -m train`, or imported), runs the rows of the SparseGPT / GPTQ
papers' OPT tables: dense; magnitude and SparseGPT at 50%, 4:8 and 2:4; SparseGPT 50% + 4-bit; GPTQ and
round-to-nearest at 4 and 3 bits; then perplexity against unstructured sparsity from 10% to 80% for magnitude vs
SparseGPT. Perplexity uses `infer.evaluate`'s protocol (validation stream, non-overlapping windows of data.seq_len);
every row shares one set of calibration windows. Writes OUT/results.md, OUT/results.json and OUT/sparsity_curve.png
(OUT defaults to WORKDIR/case_study_sparsegpt) and prints the table.
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

# The papers' OPT-125M numbers (WikiText2 perplexity): SparseGPT (Frantar and Alistarh, 2023) Table 1 and
# GPTQ (Frantar et al., 2023) Table 3, as quoted in the issue.
PAPER_OPT125M = {"dense": 27.66, "magnitude 50%": 193.0, "sparsegpt 50%": 36.85, "gptq 4-bit": 31.12,
                 "rtn 4-bit": 37.28}


def rows() -> list[dict]:
  """The table's rows as configs/compress.py overrides (None: the dense model)."""
  table = [None]
  for method in ("magnitude", "sparsegpt"):
    table += [dict(method=method, sparsity=0.5), dict(method=method, prune_n=4, prune_m=8),
              dict(method=method, prune_n=2, prune_m=4)]
  table += [dict(method="sparsegpt", sparsity=0.5, bits=4)]
  for method in ("gptq", "rtn"):
    table += [dict(method=method, bits=4), dict(method=method, bits=3)]
  return table


def _config(overrides: dict):
  c = compress_config.get_config()
  c.update(overrides)
  return compress_config.validate(c)


def run(workdir: str, out: str, *, calibration_samples: int = 128, eval_tokens: int = 0,
        only: list[str] | None = None, curve: list[float] = (), data: str = "") -> dict:
  """Runs the case study; returns {"rows": [...], "curve": {...}, ...} as also written to out/results.json."""
  config, model, tokenizer, step = loading.load_trained(workdir)
  if model.spec.quant != "none":
    raise ValueError(f"{workdir} holds an int8 model (quant={model.spec.quant}); use the float workdir")
  if data:
    config.data.source = data
  seq_len = config.data.seq_len
  tokens = evaluate.validation_stream(config, tokenizer, eval_tokens or None)
  window_nll = evaluate.make_window_nll(model)
  base = compress_config.get_config()
  start = time.perf_counter()
  samples = calibrate.calibration_samples(config, tokenizer, num_samples=calibration_samples,
                                          seq_len=base.calibration_len or seq_len, seed=base.calibration_seed)
  sampling_s = time.perf_counter() - start

  def score(m):
    return evaluate.stream_perplexity(m, tokens, seq_len, 8, window_nll)["ppl"]

  def compressed(overrides):
    c = _config(overrides)
    result = compress.compress_workdir(config, model, tokenizer, step, c, source_workdir=workdir, samples=samples)
    return c, result

  results = []
  dense_ppl = score(model)
  for overrides in rows():
    label = "dense" if overrides is None else compress_config.describe(_config(overrides))
    if only and label not in only:
      continue
    if overrides is None:
      row = {"label": label, "sparsity": 0.0, "bits_per_weight": 32.0, "ppl": dense_ppl, "time_s": 0.0}
    else:
      c, result = compressed(overrides)
      s = result["metadata"]["summary"]
      row = {"label": label, "method": c.method, "sparsity": s["sparsity"], "bits_per_weight": s["bits_per_weight"],
             "ppl": score(result["model"]), "time_s": result["metadata"]["time_s"]}
    row["ppl_vs_dense"] = row["ppl"] / dense_ppl
    row["paper_opt125m"] = PAPER_OPT125M.get(label)
    results.append(row)
    print(f"{label:26s} ppl {row['ppl']:9.2f}  ({row['ppl_vs_dense']:.3f}x dense)  {row['time_s']:6.1f} s", flush=True)
  curve_points = {"magnitude": [], "sparsegpt": []}
  for sparsity in curve:
    for method in curve_points:
      _, result = compressed(dict(method=method, sparsity=float(sparsity)))
      curve_points[method].append({"sparsity": float(sparsity), "ppl": score(result["model"]),
                                   "time_s": result["metadata"]["time_s"]})
    print(f"curve {float(sparsity):.0%}: magnitude {curve_points['magnitude'][-1]['ppl']:.2f}, "
          f"sparsegpt {curve_points['sparsegpt'][-1]['ppl']:.2f}", flush=True)
  report = {"workdir": os.path.abspath(workdir), "step": step, "data": config.data.source, "dense_ppl": dense_ppl, "eval_tokens": len(tokens),
            "seq_len": seq_len, "calibration_samples": calibration_samples, "calibration_sampling_s": sampling_s,
            "params": int(sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))),
            "rows": results, "curve": curve_points if curve else None}
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
  lines = [f"Validation perplexity of `{report['workdir']}` (step {report['step']}) on `{report['data']}`, "
           f"{report['eval_tokens']:,} "
           f"tokens in windows of {report['seq_len']}; {report['calibration_samples']} calibration windows.", "",
           "| method | sparsity | bits/weight | perplexity | vs dense | time (s) | paper OPT-125M |",
           "|---|---|---|---|---|---|---|"]
  for r in report["rows"]:
    paper = f"{r['paper_opt125m']:.2f}" if r["paper_opt125m"] else "-"
    lines.append(f"| {r['label']} | {r['sparsity']:.1%} | {r['bits_per_weight']:.2f} | {r['ppl']:.2f} | "
                 f"{r['ppl_vs_dense']:.3f}x | {r['time_s']:.1f} | {paper} |")
  if report["curve"]:
    lines += ["", "| sparsity | magnitude | sparsegpt |", "|---|---|---|"]
    for m, s in zip(report["curve"]["magnitude"], report["curve"]["sparsegpt"]):
      lines.append(f"| {m['sparsity']:.0%} | {m['ppl']:.2f} | {s['ppl']:.2f} |")
  return "\n".join(lines) + "\n"


def plot(curve: dict, dense_ppl: float, path: str) -> None:
  fig, ax = plt.subplots(figsize=(6, 4))
  for method, points in curve.items():
    ax.plot([100 * p["sparsity"] for p in points], [p["ppl"] for p in points], marker="o", label=method)
  ax.axhline(dense_ppl, color="gray", linestyle="--", label="dense")
  ax.set_yscale("log")
  ax.set_xlabel("unstructured sparsity of every block linear layer (%)")
  ax.set_ylabel("validation perplexity")
  ax.set_title("One-shot pruning: magnitude vs SparseGPT")
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def _define_flags():
  """Flags exist only when run as a script, so tests can import several scripts."""
  flags.DEFINE_string("workdir", None, "Trained float workdir.", required=True)
  flags.DEFINE_string("out", "", "Output directory (default WORKDIR/case_study_sparsegpt).")
  flags.DEFINE_integer("calibration_samples", 128, "Calibration windows (the papers use 128).")
  flags.DEFINE_integer("eval_tokens", 0, "Validation tokens scored per row (0: the whole split).")
  flags.DEFINE_string("data", "", "Data source for calibration (train split) and scoring (validation split); "
                      "default: the run's data.source, e.g. files:/data/wikitext2/*.txt.")
  flags.DEFINE_list("rows", [], "Only these row labels (default: all), e.g. 'dense,sparsegpt 50%'.")
  flags.DEFINE_list("curve", ["0.1", "0.2", "0.3", "0.4", "0.5", "0.6", "0.7", "0.8"],
                    "Sparsities of the magnitude vs SparseGPT curve (empty: no curve).")


def main(argv):
  del argv
  f = flags.FLAGS
  out = f.out or os.path.join(f.workdir, "case_study_sparsegpt")
  try:
    report = run(f.workdir, out, calibration_samples=f.calibration_samples, eval_tokens=f.eval_tokens, only=f.rows,
                 curve=[float(s) for s in f.curve], data=f.data)
  except (FileNotFoundError, ValueError) as e:
    sys.exit(f"error: {e}")
  print(markdown(report))
  print(f"written to {out}/results.md, results.json" + (", sparsity_curve.png" if report["curve"] else ""))


if __name__ == "__main__":
  _define_flags()
  app.run(main)
