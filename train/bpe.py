"""The run's tokenizer at training time: a byte-level BPE trained on the training split, or a given tokenizer.json.

`load_or_train` is what the trainer calls; the tokenizer then lives in the workdir (see `workdir.tokenizer`), so
inference never needs this module.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator

import ml_collections
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from train import data
from workdir import layout
from workdir import tokenizer as tokenizer_lib
from workdir.tokenizer import EOT

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
  """The run's tokenizer: `data.tokenizer_path` if set (copied into the workdir with its tokenizer_config.json),
  else DIR/tokenizer.json if present, else a BPE of `model.vocab_size` trained on the first
  `data.tokenizer_train_bytes` bytes of the train split (`train_source`, or `data.load_sources(config)['train']`)
  and saved to DIR/tokenizer.json."""
  if config.data.tokenizer_path:
    path = os.path.expanduser(config.data.tokenizer_path)
    if not os.path.isfile(path):
      raise FileNotFoundError(f"config.data.tokenizer_path={config.data.tokenizer_path!r} does not exist; point it at "
                              f"a tokenizer.json or set it to '' to train one on the training split")
    tok = tokenizer_lib.check_fits(tokenizer_lib.load(path), config, f"data.tokenizer_path={path!r}")
    source_dir = os.path.dirname(path)
    if os.path.abspath(source_dir) != os.path.abspath(workdir):
      tokenizer_lib.save(tok, workdir)  # the workdir stays self-contained for inference
      hf_config = layout.path(source_dir, layout.TOKENIZER_CONFIG)
      if os.path.isfile(hf_config):
        layout.write_json(layout.path(workdir, layout.TOKENIZER_CONFIG), layout.read_json(hf_config), indent=2)
    return tok
  path = layout.path(workdir, layout.TOKENIZER)
  if os.path.isfile(path):
    return tokenizer_lib.check_fits(tokenizer_lib.load(path), config, f"{path!r} (delete it to retrain)")
  if config.data.tokenizer_train_bytes <= 0:
    raise ValueError(f"config.data.tokenizer_train_bytes={config.data.tokenizer_train_bytes!r} must be > 0")
  if train_source is None:
    train_source = data.load_sources(config)["train"]
  tok = train_tokenizer(_texts_up_to(train_source, config.data.tokenizer_train_bytes), config.model.vocab_size)
  tokenizer_lib.save(tok, workdir)
  return tok
