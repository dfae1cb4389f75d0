"""Moves models between Hugging Face directories and peakllm workdirs.

  python -m scripts.convert --from_hf=DIR --workdir=OUT [--dtype=float32]
      config.json + safetensors + tokenizer.json of DIR -> a workdir (config, orbax parameters at step 0,
      tokenizer) that infer.generate, infer.evaluate, infer.compress, infer.serve and fine-tuning
      (`python -m train --config=configs/finetune.py:OUT`) accept.
  python -m scripts.convert --to_hf=OUT_DIR --workdir=DIR [--adapter=ADAPTER] [--step=N] [--max_shard_gb=5]
      the latest (or given) parameters of a workdir -> a directory `transformers` loads with from_pretrained.
      A LoRA run (float base) exports merged; --adapter (a PEFT directory or LoRA run) is merged in first.
  python -m scripts.convert --to_peft=OUT_DIR --workdir=LORA_RUN [--step=N]
      the adapters of a LoRA (or QLoRA) run -> a PEFT directory (adapter_config.json + adapter_model.safetensors)
      that `peft.PeftModel.from_pretrained` loads over the Hugging Face export of the base.
"""

from __future__ import annotations

import os
import shutil
import sys

from absl import app, flags
from flax import nnx

from infer import loading
from model import flops, hf, lora, peft
from model.transformer import ModelSpec
from workdir import checkpoint, layout
from workdir import tokenizer as tokenizer_lib

HF_CONFIG_COPY = "hf_config.json"  # the imported config.json, kept for its token ids
_TOKEN_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id")


def import_hf(hf_dir: str, workdir: str, dtype: str = "float32") -> dict:
  """Writes the Hugging Face model of `hf_dir` as a peakllm workdir; returns a summary dict."""
  if os.path.isdir(layout.checkpoint_dir(workdir)):
    raise FileExistsError(f"{workdir} already holds checkpoints: import into a new workdir")
  tokenizer_path = layout.path(hf_dir, layout.TOKENIZER)
  if not os.path.isfile(tokenizer_path):
    raise FileNotFoundError(f"{tokenizer_path} not found: save the fast tokenizer first, e.g. "
                            f"AutoTokenizer.from_pretrained(DIR).save_pretrained(DIR)")
  hf_cfg = hf.read_config(hf_dir)
  config = hf.config_from_hf(hf_cfg, dtype)
  tok = tokenizer_lib.load(tokenizer_path)  # checks its bos/eos tokens
  if tok.get_vocab_size() > config.model.vocab_size:
    raise ValueError(f"{tokenizer_path} has {tok.get_vocab_size()} entries, more than the model's vocab_size="
                     f"{config.model.vocab_size}")
  model = hf.load_weights(hf_dir, ModelSpec.from_config(config.model))
  os.makedirs(workdir, exist_ok=True)
  layout.copy_tokenizer(hf_dir, workdir)
  shutil.copy(os.path.join(hf_dir, "config.json"), layout.path(workdir, HF_CONFIG_COPY))
  layout.write_config(config, workdir)
  checkpoint.save_params(workdir, 0, nnx.to_pure_dict(nnx.state(model, nnx.Param)))
  return {"model_type": hf_cfg["model_type"], "parameters": flops.tree_param_count(model)}


def export_hf(workdir: str, out_dir: str, step: int | None = None, max_shard_bytes: int = 5 * 2**30,
              adapter: str | None = None) -> str:
  """Writes the latest (or given) parameters of `workdir` as a Hugging Face directory, with its tokenizer; LoRA
  adapters (of a LoRA run, or `adapter`) merged in."""
  config, model, tok, step = loading.load_trained(workdir, step, adapter=adapter)
  if model.spec.quant != "none":
    raise ValueError(f"{workdir} holds quantized weights (model.quant={model.spec.quant!r}"
                     f"{', a QLoRA base' if model.spec.lora_rank else ''}): export the float workdir"
                     f"{' (and its adapters with --to_peft)' if model.spec.lora_rank else ''}")
  extra = {"bos_token_id": tokenizer_lib.bos_id(tok), "eos_token_id": tokenizer_lib.eot_id(tok)}
  imported = layout.path(workdir, HF_CONFIG_COPY)
  model_type = None
  if os.path.isfile(imported):
    original = layout.read_json(imported)
    extra.update({k: v for k, v in original.items() if k in _TOKEN_KEYS})
    model_type = original.get("model_type")  # Mistral imports go back as Mistral
  files = {name: layout.path(workdir, name) for name in (layout.TOKENIZER, layout.TOKENIZER_CONFIG)
           if os.path.isfile(layout.path(workdir, name))}
  if layout.TOKENIZER_CONFIG not in files:  # our own tokenizer: tell transformers how to load it
    files[layout.TOKENIZER_CONFIG] = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": tokenizer_lib.EOT,
                                      "eos_token": tokenizer_lib.EOT, "model_max_length": model.spec.max_len}
  return hf.save_pretrained(model, out_dir, model_type=model_type, extra_config=extra, max_shard_bytes=max_shard_bytes, extra_files=files)


def export_peft(workdir: str, out_dir: str, step: int | None = None) -> str:
  """Writes the adapters of the LoRA run `workdir` as a PEFT LoRA directory for the Hugging Face export of its
  base (`model_type` as the base was imported)."""
  config, model, _, step = loading.load_trained(workdir, step, merge_lora=False)
  if not model.spec.lora_rank:
    raise ValueError(f"{workdir} is not a LoRA run (config.train.lora.rank=0): export it with --to_hf")
  imported = layout.path(config.train.init_from, HF_CONFIG_COPY) if config.train.init_from else ""
  model_type = layout.read_json(imported).get("model_type") if imported and os.path.isfile(imported) else None
  adapters, _ = lora.split(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
  return peft.save_adapter(model.spec, adapters, out_dir, base_model=config.train.init_from, model_type=model_type)


def _define_flags():
  # Defined only when run as a script, so importing this module never clashes with other programs' flags.
  flags.DEFINE_string("from_hf", None, "Hugging Face model directory to import.")
  flags.DEFINE_string("to_hf", None, "Directory to export a Hugging Face model into (must be new or empty).")
  flags.DEFINE_string("to_peft", None, "Directory to export a LoRA run's adapters into, in the PEFT format.")
  flags.DEFINE_string("adapter", None, "Export: a LoRA adapter (PEFT directory or LoRA run) merged into the model.")
  flags.DEFINE_string("workdir", None, "The peakllm workdir written (import) or read (export).", required=True)
  flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16", "float16"], "Import: parameter/compute dtype.")
  flags.DEFINE_integer("step", None, "Export: checkpoint step (default: latest).")
  flags.DEFINE_float("max_shard_gb", 5.0, "Export: largest safetensors file before sharding with an index.")


def main(argv):
  del argv
  f = flags.FLAGS
  if sum(map(bool, (f.from_hf, f.to_hf, f.to_peft))) != 1:
    sys.exit("error: give exactly one of --from_hf=DIR (import), --to_hf=DIR (export) or --to_peft=DIR (adapters)")
  try:
    if f.from_hf:
      summary = import_hf(f.from_hf, f.workdir, f.dtype)
      print(f"imported {summary['model_type']} ({summary['parameters'] / 1e6:.1f}M parameters) into {f.workdir}")
    elif f.to_peft:
      print(f"exported the adapters of {f.workdir} to {export_peft(f.workdir, f.to_peft, f.step)}")
    else:
      out = export_hf(f.workdir, f.to_hf, f.step, int(f.max_shard_gb * 2**30), adapter=f.adapter)
      print(f"exported {f.workdir} to {out}")
  except (ValueError, FileNotFoundError, FileExistsError) as e:
    sys.exit(f"error: {e}")


if __name__ == "__main__":
  _define_flags()
  app.run(main)
