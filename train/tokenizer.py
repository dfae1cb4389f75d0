"""Byte-level BPE tokenizer (HF `tokenizers`): train, save, load, encode, decode.

Every byte sequence is representable (the 256-symbol byte alphabet is always in the vocabulary), so
`decode(tok, encode(tok, text)) == text` for any str. Id 0 is the special token `<|endoftext|>` (EOT), which the data
pipeline puts around every document.

Tokenizers imported from Hugging Face (`scripts/convert.py`) keep their own document tokens: `load` reads the
`bos_token` / `eos_token` of a `tokenizer_config.json` beside the tokenizer.json (OPT: `</s>` for both, Llama:
`<s>` and `</s>`) and `bos_id` / `eot_id` return them; without one, both are `<|endoftext|>`.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterable, Iterator, Sequence

import ml_collections
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

EOT = "<|endoftext|>"
MIN_VOCAB_SIZE = 257  # 256 byte symbols + EOT


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> Tokenizer:
  """Trains a byte-level BPE on `texts`; the result has at most `vocab_size` entries (fewer if the text runs out of
  pairs to merge), EOT at id 0, then the 256 byte symbols, then merges."""
  if vocab_size < MIN_VOCAB_SIZE:
    raise ValueError(f"config.model.vocab_size={vocab_size} is too small for a byte-level BPE: it must be >= "
                     f"{MIN_VOCAB_SIZE} (256 bytes + {EOT})")
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOT],
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
  tok.train_from_iterator(texts, trainer=trainer)
  assert tok.get_vocab_size() <= vocab_size, (tok.get_vocab_size(), vocab_size)
  assert tok.token_to_id(EOT) == 0
  return tok


HF_CONFIG = "tokenizer_config.json"  # Hugging Face's file of special tokens, kept beside tokenizer.json


def load(path: str) -> Tokenizer:
  """The tokenizer of a tokenizer.json, with the document tokens of a `tokenizer_config.json` beside it, if any
  (kept as the attributes `bos_token` / `eos_token`, which `bos_id` and `eot_id` read)."""
  tok = Tokenizer.from_file(path)
  config_path = os.path.join(os.path.dirname(path), HF_CONFIG)
  if os.path.isfile(config_path):
    with open(config_path, encoding="utf-8") as f:
      hf = json.load(f)
    for key in ("bos_token", "eos_token"):
      token = hf.get(key)
      token = token.get("content") if isinstance(token, dict) else token
      if token is not None and tok.token_to_id(token) is None:
        raise ValueError(f"{config_path}: {key}={token!r} is not in the vocabulary of {path}")
      setattr(tok, key, token)
  return tok


def copy(src_dir: str, dst_dir: str) -> None:
  """Copies tokenizer.json and its tokenizer_config.json (if any) from src_dir to dst_dir."""
  for name in ("tokenizer.json", HF_CONFIG):
    if os.path.isfile(os.path.join(src_dir, name)):
      shutil.copy(os.path.join(src_dir, name), os.path.join(dst_dir, name))


def _special_id(tok: Tokenizer, token: str | None, what: str) -> int:
  i = tok.token_to_id(token or EOT)
  if i is None:
    raise ValueError(f"tokenizer has no {token or EOT} token; peakllm needs it as the {what} (a tokenizer.json "
                     f"without {EOT} needs a tokenizer_config.json naming its bos_token and eos_token)")
  return i


def eot_id(tok: Tokenizer) -> int:
  """Id of the end-of-document token: the eos_token of an imported tokenizer, else `<|endoftext|>`."""
  return _special_id(tok, getattr(tok, "eos_token", None), "end-of-document token")


def bos_id(tok: Tokenizer) -> int:
  """Id of the token that starts documents and prompts: the bos_token of an imported tokenizer, else the EOT."""
  token = getattr(tok, "bos_token", None) or getattr(tok, "eos_token", None)
  return _special_id(tok, token, "start-of-document token")


def encode(tok: Tokenizer, text: str) -> list[int]:
  """Token ids of `text` (no EOT added; a literal '<|endoftext|>' in the text maps to the EOT id)."""
  return tok.encode(text, add_special_tokens=False).ids


def decode(tok: Tokenizer, ids: Sequence[int]) -> str:
  """Inverse of `encode`; EOT ids come back as the string '<|endoftext|>'."""
  return tok.decode(list(map(int, ids)), skip_special_tokens=False)


def _check_vocab(tok: Tokenizer, config: ml_collections.ConfigDict, where: str) -> Tokenizer:
  eot_id(tok)
  bos_id(tok)
  if tok.get_vocab_size() > config.model.vocab_size:
    raise ValueError(f"tokenizer {where} has {tok.get_vocab_size()} entries but config.model.vocab_size="
                     f"{config.model.vocab_size}; raise model.vocab_size or use a smaller tokenizer")
  return tok


def _texts_up_to(source, max_bytes: int) -> Iterator[str]:
  """Decoded `text` of the records of `source` in order, cut so that at most `max_bytes` UTF-8 bytes are yielded."""
  left = max_bytes
  for i in range(len(source)):
    if left <= 0:
      return
    raw = source[i]["text"]
    raw = raw.encode("utf-8") if isinstance(raw, str) else bytes(raw)
    raw = raw[:left]
    left -= len(raw)
    yield raw.decode("utf-8", errors="ignore")


def load_or_train(config: ml_collections.ConfigDict, workdir: str, train_source=None) -> Tokenizer:
  """The run's tokenizer: `data.tokenizer_path` if set (copied to `workdir/tokenizer.json`), else `workdir/tokenizer.json` if present, else a BPE of
  `model.vocab_size` trained on the first `data.tokenizer_train_bytes` bytes of the train split (`train_source`, or
  `data.load_sources(config)['train']`) and saved to `workdir/tokenizer.json`."""
  if config.data.tokenizer_path:
    path = os.path.expanduser(config.data.tokenizer_path)
    if not os.path.isfile(path):
      raise FileNotFoundError(f"config.data.tokenizer_path={config.data.tokenizer_path!r} does not exist; point it at "
                              f"a tokenizer.json or set it to '' to train one on the training split")
    tok = _check_vocab(load(path), config, f"data.tokenizer_path={path!r}")
    if os.path.abspath(os.path.dirname(path)) != os.path.abspath(workdir):
      os.makedirs(workdir, exist_ok=True)
      _save(tok, os.path.join(workdir, "tokenizer.json"))  # the workdir stays self-contained for inference
      if os.path.isfile(os.path.join(os.path.dirname(path), HF_CONFIG)):
        shutil.copy(os.path.join(os.path.dirname(path), HF_CONFIG), os.path.join(workdir, HF_CONFIG))
    return tok
  path = os.path.join(workdir, "tokenizer.json")
  if os.path.isfile(path):
    return _check_vocab(load(path), config, f"{path!r} (delete it to retrain)")
  if config.data.tokenizer_train_bytes <= 0:
    raise ValueError(f"config.data.tokenizer_train_bytes={config.data.tokenizer_train_bytes!r} must be > 0")
  if train_source is None:
    from train import data  # pylint: disable=import-outside-toplevel
    train_source = data.load_sources(config)["train"]
  tok = train_tokenizer(_texts_up_to(train_source, config.data.tokenizer_train_bytes), config.model.vocab_size)
  _save(tok, path)
  return tok


def _save(tok: Tokenizer, path: str) -> None:
  """Writes tok to path atomically (a temporary file renamed into place)."""
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  tmp = f"{path}.tmp.{os.getpid()}"
  tok.save(tmp)
  os.replace(tmp, path)
