"""One-shot compression of a trained workdir into a new workdir.

  python -m infer.compress --workdir=runs/default --out=runs/default_sparsegpt50 --compress.sparsity=0.5
  python -m infer.compress --workdir=runs/default --out=runs/default_gptq4 --compress.method=gptq --compress.bits=4
  python -m infer.compress --workdir=runs/default --out=runs/default_24 --compress.prune_n=2 --compress.prune_m=4
  python -m infer.compress --workdir=runs/case_study --out=runs/cs_wanda60 --compress.method=wanda \
      --compress.sparsity=0.6 --compress.layer_sparsity=sensitivity

Every key of configs/compress.py can be set as --compress.KEY=VALUE. Prints and stores (compression.json) the
sparsity of every compressed weight per layer, bits per weight and the time taken; `--eval_tokens` > 0 also scores
the float and the compressed model on the validation stream (infer.evaluate's protocol).
"""

from __future__ import annotations

import json
import sys

from absl import app, flags
from ml_collections import config_flags

from configs import compress as compress_config
from infer import evaluate, loading
from infer.compress.pipeline import compress_workdir

_CONFIG = config_flags.DEFINE_config_file("compress", "configs/compress.py", "Compression method and knobs.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Trained float workdir.", required=True)
_OUT = flags.DEFINE_string("out", None, "New workdir for the compressed model.", required=True)
_EVAL_TOKENS = flags.DEFINE_integer("eval_tokens", 65536, "Validation tokens scored before/after (0 skips).")


def main(argv):
  del argv
  c = _CONFIG.value
  try:
    compress_config.validate(c)
    config, model, tokenizer, step = loading.load_trained(_WORKDIR.value)
    out = compress_workdir(config, model, tokenizer, step, c, source_workdir=_WORKDIR.value, out=_OUT.value)
  except (FileNotFoundError, FileExistsError, ValueError) as e:
    sys.exit(f"error: {e}")
  s = out["metadata"]["summary"]
  print(f"{out['metadata']['label']}: {s['compressed_params']:,} block weights, sparsity {s['sparsity']:.1%}, "
        f"{s['bits_per_weight']:.2f} bits per weight, {out['metadata']['time_s']:.1f} s -> {_OUT.value}")
  if out["metadata"]["block_sparsity_targets"]:
    print(f"  block sparsity targets ({c.layer_sparsity}): "
          + ", ".join(f"{x:.3f}" for x in out["metadata"]["block_sparsity_targets"]))
  for path, w in s["weights"].items():
    print(f"  {path:10s} bits {w['bits'] or 32:2d}  sparsity per layer {', '.join(f'{x:.3f}' for x in w['sparsity'])}")
  if _EVAL_TOKENS.value:
    tokens = evaluate.validation_stream(config, tokenizer, _EVAL_TOKENS.value)
    seq_len = config.data.seq_len
    report = {"dense": evaluate.stream_perplexity(model, tokens, seq_len),
              "compressed": evaluate.stream_perplexity(out["model"], tokens, seq_len)}
    print(json.dumps({k: round(v["ppl"], 3) for k, v in report.items()}))


if __name__ == "__main__":
  app.run(main)
