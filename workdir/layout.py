"""The files of a workdir and where they live: the one place that names them, writes config.json and reads it back.

  DIR/config.json          the resolved config (`write_config` / `load_config`)
  DIR/tokenizer.json       the tokenizer, with tokenizer_config.json beside it for imported ones (`workdir.tokenizer`)
  DIR/checkpoints/<step>/  orbax checkpoints (`workdir.checkpoint`)
  DIR/metrics.jsonl        one JSON object per logged step (`train.metrics`)
  DIR/summary.json         the trainer's closing summary
  DIR/compression.json     how a compressed workdir was made (`infer.compress.storage`); its presence marks one

Derived workdirs (quantized, compressed) are written by `new_derived`, which refuses a non-empty output and copies
the source's tokenizer files, so every workdir stays self-contained for inference.
"""

from __future__ import annotations

import json
import os
import shutil

import ml_collections

from configs import base

CONFIG = "config.json"
TOKENIZER = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"  # Hugging Face's file of special tokens, kept beside tokenizer.json
CHECKPOINTS = "checkpoints"
METRICS = "metrics.jsonl"
SUMMARY = "summary.json"
COMPRESSION = "compression.json"
PROFILE = "profile"  # jax.profiler traces (train.profile_steps): tensorboard --logdir <workdir>/profile


def path(workdir: str, name: str) -> str:
  """DIR/name."""
  return os.path.join(workdir, name)


def checkpoint_dir(workdir: str) -> str:
  """The absolute path of DIR/checkpoints (orbax wants absolute paths)."""
  return os.path.join(os.path.abspath(workdir), CHECKPOINTS)


def write_atomically(file_path: str, write) -> None:
  """Calls write(temporary path), then renames the temporary file into place, so a reader never sees half a file
  and an interrupted write leaves the old one."""
  os.makedirs(os.path.dirname(file_path) or ".", exist_ok=True)
  tmp = f"{file_path}.tmp.{os.getpid()}"
  write(tmp)
  os.replace(tmp, file_path)


def _write_text(file_path: str, text: str) -> None:
  def write(tmp):
    with open(tmp, "w", encoding="utf-8") as f:
      f.write(text)
  write_atomically(file_path, write)


def write_json(file_path: str, obj, **dump_kwargs) -> None:
  """Writes `obj` as JSON atomically."""
  _write_text(file_path, json.dumps(obj, **dump_kwargs))


def read_json(file_path: str):
  with open(file_path, encoding="utf-8") as f:
    return json.load(f)


def write_config(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Writes the resolved config to DIR/config.json (atomically)."""
  _write_text(path(workdir, CONFIG), config.to_json_best_effort(indent=2))


def check_resumable(workdir: str, config: ml_collections.ConfigDict) -> None:
  """Refuses (ValueError, before anything in `workdir` is touched) a config that differs from the one a run already
  wrote there, listing every differing key with its old and new value; the keys of base.RESUME_MAY_CHANGE may
  differ. A workdir without config.json passes."""
  if not os.path.exists(path(workdir, CONFIG)):
    return
  changes = base.config_changes(load_config(workdir), config)
  if changes:
    listed = "; ".join(f"{key}: {old!r} -> {new!r}" for key, old, new in changes)
    raise ValueError(f"{workdir} holds a run with a different config ({listed}). Resume with the same config (only "
                     f"{', '.join(base.RESUME_MAY_CHANGE)} may change) or use a new --workdir")


def load_config(workdir: str) -> ml_collections.ConfigDict:
  """The resolved config written to DIR/config.json, over today's defaults (keys added since keep their defaults),
  validated. FileNotFoundError when DIR holds none."""
  file_path = path(workdir, CONFIG)
  if not os.path.exists(file_path):
    raise FileNotFoundError(f"{file_path} not found: --workdir must be a directory written by `python -m train`")
  saved = read_json(file_path)
  config = base.get_config()
  for section, values in saved.items():
    if isinstance(values, dict) and section in config:
      config[section].update(values)
    else:
      config[section] = values
  return base.validate(config)


def is_compressed(workdir: str) -> bool:
  """Whether DIR was written by `infer.compress` or a QMoE case study (it holds compression.json)."""
  return os.path.exists(path(workdir, COMPRESSION))


def new_derived(out: str, source_workdir: str, config: ml_collections.ConfigDict) -> None:
  """Starts a workdir derived from `source_workdir` (a quantized or compressed copy): refuses an `out` that exists
  and is not empty, then writes `config` and copies the tokenizer files (tokenizer.json and, for imported
  tokenizers, tokenizer_config.json with their BOS/EOS)."""
  if os.path.exists(out) and os.listdir(out):
    raise FileExistsError(f"{out} exists and is not empty; choose a new directory")
  os.makedirs(out, exist_ok=True)
  write_config(config, out)
  copy_tokenizer(source_workdir, out)


def copy_tokenizer(src_dir: str, dst_dir: str) -> None:
  """Copies tokenizer.json and its tokenizer_config.json (if any) from src_dir to dst_dir (each atomically)."""
  for name in (TOKENIZER, TOKENIZER_CONFIG):
    src = path(src_dir, name)
    if os.path.isfile(src) and os.path.abspath(src) != os.path.abspath(path(dst_dir, name)):
      write_atomically(path(dst_dir, name), lambda tmp, src=src: shutil.copyfile(src, tmp))
