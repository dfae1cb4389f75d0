"""Post-training int8 quantization of a trained workdir: W8A16 weight-only or W8A8 with SmoothQuant.

  python -m infer.quantize --workdir=runs/default --mode=int8_weight --out=runs/default_w8a16
  python -m infer.quantize --workdir=runs/default --mode=w8a8 --out=runs/default_w8a8 [--alpha=0.5]

The output directory is a workdir that `infer.generate` and `infer.evaluate` load: config.json (model.quant set),
the tokenizer files and an orbax checkpoint of the int8 parameters with their scales. W8A8 calibrates SmoothQuant on
`--calibration_batches` training batches. Prints parameter bytes (float32, bfloat16 equivalent, int8) and the
held-out perplexity of the float and the quantized model on the same validation tokens.
"""

from __future__ import annotations

import json
import os
import sys

import jax
import jax.numpy as jnp
from absl import app, flags
from flax import nnx

from configs import base
from infer import evaluate, loading
from model import quant, transformer
from train import data as data_lib
from workdir import checkpoint as checkpoint_lib
from workdir import layout

def quantize_workdir(workdir: str, out: str, mode: str, *, alpha: float = 0.5, calibration_batches: int = 8,
                     matmul_impl: str = "auto") -> dict:
  """Quantizes the latest checkpoint of `workdir` into the new workdir `out`; returns sizes and the config."""
  if os.path.exists(out) and os.listdir(out):  # refused before any work
    raise FileExistsError(f"--out={out} exists and is not empty; choose a new directory")
  config, model, tokenizer, step = loading.load_trained(workdir)
  spec = model.spec
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  stats = None
  if mode == "w8a8":
    source = data_lib.load_sources(config)["train"]
    iterator = data_lib.make_iterator(config, source, tokenizer, split="train")
    stats = quant.calibrate(model, (next(iterator) for _ in range(calibration_batches)))
    if hasattr(iterator, "close"):
      iterator.close()
  qspec, qparams = quant.quantize_model_params(spec, params, mode, stats, alpha)
  qconfig = config.copy_and_resolve_references()
  qconfig.model.quant, qconfig.model.matmul_impl = mode, matmul_impl
  layout.new_derived(out, workdir, qconfig)
  checkpoint_lib.save_params(out, step, qparams)
  float_bytes = quant.nbytes(params)
  return {"mode": mode, "step": step, "float32_bytes": float_bytes, "float_model": model, "float_config": config,
          "bfloat16_bytes": sum(x.size * (2 if x.dtype == jnp.float32 else x.dtype.itemsize)
                                for x in jax.tree.leaves(params)),
          "quantized_bytes": quant.nbytes(qparams), "checkpoint_dir_bytes": _dir_bytes(layout.checkpoint_dir(out)),
          "config": qconfig, "tokenizer": tokenizer, "params": qparams, "spec": qspec}


def _dir_bytes(path: str) -> int:
  return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def _define_flags():
  # Defined only when run as a command, so importing this module never clashes with other programs' flags.
  flags.DEFINE_string("workdir", None, "Trained float workdir.", required=True)
  flags.DEFINE_string("out", None, "Output workdir for the quantized model.", required=True)
  flags.DEFINE_enum("mode", "int8_weight", ["int8_weight", "w8a8"], "W8A16 weight-only or W8A8 SmoothQuant.")
  flags.DEFINE_float("alpha", 0.5, "SmoothQuant migration strength (w8a8).")
  flags.DEFINE_integer("calibration_batches", 8, "Training batches for SmoothQuant statistics.")
  flags.DEFINE_enum("matmul_impl", "auto", list(base.MATMUL_IMPLS), "How the quantized model's matmuls run.")
  flags.DEFINE_integer("eval_batches", None, "Validation batches for the perplexity comparison (0 skips).")


def main(argv):
  del argv
  f = flags.FLAGS
  try:
    result = quantize_workdir(f.workdir, f.out, f.mode, alpha=f.alpha,
                              calibration_batches=f.calibration_batches, matmul_impl=f.matmul_impl)
  except (FileNotFoundError, FileExistsError, ValueError) as e:
    sys.exit(f"error: {e}")
  report = {k: result[k] for k in ("mode", "step", "float32_bytes", "bfloat16_bytes", "quantized_bytes",
                                   "checkpoint_dir_bytes")}
  if f.eval_batches != 0:
    tokenizer = result["tokenizer"]
    report["float_eval"] = evaluate.perplexity(result["float_model"], result["float_config"], tokenizer, f.eval_batches)
    qmodel = transformer.from_params(result["spec"], result["params"])
    report["quantized_eval"] = evaluate.perplexity(qmodel, result["config"], tokenizer, f.eval_batches)
  print(json.dumps(report, indent=2))
  layout.write_json(layout.path(f.out, "quantize_report.json"), report, indent=2)


if __name__ == "__main__":
  _define_flags()
  app.run(main)
