"""Byte-level BPE tokenizer (HF `tokenizers`): train, save, load, encode, decode.

Every byte sequence is representable (the 256-symbol byte alphabet is always in the vocabulary), so
`decode(tok, encode(tok, text)) == text` for any str. Id 0 is the special token `<|endoftext|>` (EOT), which the data
pipeline puts around every document.
"""

from __future__ import annotations

import os
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


def eot_id(tok: Tokenizer) -> int:
  """Id of `<|endoftext|>`; ValueError if the tokenizer lacks it."""
  i = tok.token_to_id(EOT)
  if i is None:
    raise ValueError(f"tokenizer has no {EOT} token; peakllm needs it as document separator")
  return i


def encode(tok: Tokenizer, text: str) -> list[int]:
  """Token ids of `text` (no EOT added; a literal '<|endoftext|>' in the text maps to the EOT id)."""
  return tok.encode(text, add_special_tokens=False).ids


def decode(tok: Tokenizer, ids: Sequence[int]) -> str:
  """Inverse of `encode`; EOT ids come back as the string '<|endoftext|>'."""
  return tok.decode(list(map(int, ids)), skip_special_tokens=False)


def _check_vocab(tok: Tokenizer, config: ml_collections.ConfigDict, where: str) -> Tokenizer:
  eot_id(tok)
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
    tok = _check_vocab(Tokenizer.from_file(path), config, f"data.tokenizer_path={path!r}")
    _save(tok, os.path.join(workdir, "tokenizer.json"))  # the workdir stays self-contained for inference
    return tok
  path = os.path.join(workdir, "tokenizer.json")
  if os.path.isfile(path):
    return _check_vocab(Tokenizer.from_file(path), config, f"{path!r} (delete it to retrain)")
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
