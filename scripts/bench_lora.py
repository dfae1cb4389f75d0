"""Fine-tuning memory and speed: full fine-tuning vs LoRA vs QLoRA (int8 and 4-bit bases) on an imported
random-weight Llama-style model, in one run. Per mode: trainable parameters, optimizer-state bytes, the frozen
base's bytes, XLA's compiled step memory (arguments, temporaries, peak = arguments + outputs + temporaries -
aliased), and the warmed-up median tokens/s of the trainer's own step on random batches.

  python -m scripts.bench_lora [--shape=small] [--steps=8] [--rank=16] [--out=docs/bench_lora.json]

The model is made by `transformers` (LlamaForCausalLM, random weights), saved and imported through
`scripts.convert` like any Hugging Face checkpoint, so the fine-tuning config is exactly `configs/finetune.py`'s.
"""

from __future__ import annotations

import json
import os
import tempfile

import jax
from absl import app, flags

from configs import finetune
from model import lora, quant, transformer
from scripts import bench_train, convert
from train import allocator
from train import setup as setup_lib
from workdir import checkpoint

SHAPES = {  # Llama-style shapes: (hidden, layers, heads, kv heads, intermediate, vocab, seq_len, batch)
    "tiny": (128, 2, 4, 2, 384, 512, 64, 4),
    "small": (512, 8, 8, 4, 1536, 8192, 256, 4),
}
MODES = {"full": {}, "lora": {"base_quant": "none"}, "qlora_int8": {"base_quant": "int8"},
         "qlora_int4": {"base_quant": "int4"}}


def make_imported_llama(shape: str, directory: str) -> str:
  """A random-weight LlamaForCausalLM of `shape` saved by transformers and imported as a peakllm workdir."""
  import torch
  import transformers

  hidden, layers, heads, kv, inter, vocab, _, _ = SHAPES[shape]
  torch.manual_seed(0)
  config = transformers.LlamaConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                                    num_key_value_heads=kv, intermediate_size=inter, vocab_size=vocab,
                                    max_position_embeddings=1024, tie_word_embeddings=False)
  hf_dir = os.path.join(directory, "hf")
  transformers.LlamaForCausalLM(config).save_pretrained(hf_dir)
  _write_tokenizer(hf_dir, vocab)
  workdir = os.path.join(directory, "imported")
  convert.import_hf(hf_dir, workdir)
  return workdir


def _write_tokenizer(hf_dir: str, vocab: int) -> None:
  from tokenizers import Tokenizer, models, pre_tokenizers

  tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab - 1)} | {"<unk>": vocab - 1}, unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  tok.save(os.path.join(hf_dir, "tokenizer.json"))
  with open(os.path.join(hf_dir, "tokenizer_config.json"), "w", encoding="utf-8") as f:
    json.dump({"bos_token": "t1", "eos_token": "t2"}, f)


def measure(workdir: str, shape: str, mode: str, rank: int, steps: int) -> dict:
  *_, seq_len, batch = SHAPES[shape]
  config = finetune.get_config(workdir)
  config.data.seq_len = seq_len
  config.train.update(batch_size=batch, steps=100, warmup_steps=1, progress_bar=False)
  config.mesh.data = 1
  if mode != "full":
    config.train.lora.update(rank=rank, alpha=2.0 * rank, **MODES[mode])
  setup = setup_lib.build(config)
  mem = setup.compile().memory_analysis()
  state = setup.init_state(_start_params(workdir, setup))
  row = {"mode": mode, "trainable_parameters": lora.count(state["params"]),
         "optimizer_state_bytes": quant.nbytes(state["opt_state"]),
         "frozen_bytes": quant.nbytes(state.get("frozen", {})), "trainable_bytes": quant.nbytes(state["params"]),
         "argument_bytes": mem.argument_size_in_bytes, "temp_bytes": mem.temp_size_in_bytes,
         "peak_bytes": mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
         - mem.alias_size_in_bytes}
  batches = [jax.device_put(bench_train.random_batch(config, i), setup.batch_sharding) for i in range(4)]
  with jax.set_mesh(setup.mesh):
    timed = bench_train._time_steps(config, setup.spec, state, setup.train_step, batches, steps, 2)
  row.update(tokens_per_sec=timed["tokens_per_sec"], step_time_s=timed["step_time_s"], final_loss=timed["final_loss"])
  return row


def _start_params(workdir: str, setup) -> dict:
  """The imported model's parameters in the float layout this set-up starts from (its base, for LoRA)."""
  target = (jax.eval_shape(lambda: transformer.init_params(lora.base_spec(setup.spec), 0)) if setup.spec.lora_rank
            else setup.abstract_state["params"])
  return checkpoint.restore_params(workdir, target)[0]


def table(rows: list[dict]) -> str:
  mib = lambda b: f"{b / 2**20:,.1f}"  # noqa: E731
  full = rows[0]
  lines = ["| mode | trainable params | optimizer state MiB | frozen base MiB | step arguments MiB | step peak MiB | "
           "tokens/s |", "|---|---|---|---|---|---|---|"]
  for r in rows:
    lines.append(f"| {r['mode']} | {r['trainable_parameters']:,} | {mib(r['optimizer_state_bytes'])} | "
                 f"{mib(r['frozen_bytes'])} | {mib(r['argument_bytes'])} | {mib(r['peak_bytes'])} "
                 f"({r['peak_bytes'] / full['peak_bytes']:.2f}x) | {r['tokens_per_sec']:,.0f} "
                 f"({r['tokens_per_sec'] / full['tokens_per_sec']:.2f}x) |")
  return "\n".join(lines)


def main(argv):
  del argv
  f = flags.FLAGS
  with tempfile.TemporaryDirectory() as directory:
    workdir = make_imported_llama(f.shape, directory)
    rows = []
    for mode in MODES:
      rows.append(measure(workdir, f.shape, mode, f.rank, f.steps))
      print(json.dumps(rows[-1]), flush=True)
  result = {"cpu": bench_train.cpu_description(), "jax": jax.__version__, "shape": f.shape,
            "shape_dims": dict(zip(("hidden", "layers", "heads", "kv_heads", "intermediate", "vocab", "seq_len",
                                    "batch"), SHAPES[f.shape])), "rank": f.rank, "rows": rows}
  print(table(rows))
  if f.out:
    with open(f.out, "w", encoding="utf-8") as fh:
      json.dump(result, fh, indent=2)


if __name__ == "__main__":
  allocator.reexec_with_tcmalloc("scripts.bench_lora")
  flags.DEFINE_enum("shape", "small", list(SHAPES), "Model shape.")
  flags.DEFINE_integer("steps", 8, "Timed steps per mode (after compilation and 2 warm-up steps).")
  flags.DEFINE_integer("rank", 16, "LoRA rank (alpha = 2 x rank), every linear layer of the blocks.")
  flags.DEFINE_string("out", "docs/bench_lora.json", "Where to write the results ('' for nowhere).")
  app.run(main)
