"""The run's tokenizer (HF `tokenizers`): its files in a workdir, encoding and decoding, and the document rule.

Every byte sequence is representable by our byte-level BPEs (trained by `train/bpe.py`), so
`decode(tok, encode(tok, text)) == text` for any str. Id 0 of those is the special token `<|endoftext|>` (EOT), which
starts and ends every document.

Tokenizers imported from Hugging Face (`scripts/convert.py`) keep their own document tokens: `load` reads the
`bos_token` / `eos_token` of a `tokenizer_config.json` beside the tokenizer.json (OPT: `</s>` for both, Llama:
`<s>` and `</s>`) and `bos_id` / `eot_id` return them; without one, both are `<|endoftext|>`.

`encode_document` is the one rule for how text enters the model: [BOS] + its ids. Training documents (plus a
closing EOT), prompts of `infer.generate` and the server, evaluation streams and calibration windows all use it.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import ml_collections
from tokenizers import Tokenizer

from workdir import layout

EOT = "<|endoftext|>"


def load(path: str) -> Tokenizer:
  """The tokenizer of a tokenizer.json, with the document tokens of a `tokenizer_config.json` beside it, if any
  (kept as the attributes `bos_token` / `eos_token`, which `bos_id` and `eot_id` read)."""
  tok = Tokenizer.from_file(path)
  config_path = os.path.join(os.path.dirname(path), layout.TOKENIZER_CONFIG)
  if os.path.isfile(config_path):
    hf = layout.read_json(config_path)
    for key in ("bos_token", "eos_token"):
      token = hf.get(key)
      token = token.get("content") if isinstance(token, dict) else token
      if token is not None and tok.token_to_id(token) is None:
        raise ValueError(f"{config_path}: {key}={token!r} is not in the vocabulary of {path}")
      setattr(tok, key, token)
  return tok


def load_from(workdir: str) -> Tokenizer:
  """The tokenizer of a workdir (DIR/tokenizer.json); FileNotFoundError naming the file when it is missing."""
  file_path = layout.path(workdir, layout.TOKENIZER)
  if not os.path.exists(file_path):
    raise FileNotFoundError(f"{file_path} not found: --workdir must be a directory written by `python -m train`")
  return load(file_path)


def save(tok: Tokenizer, workdir: str) -> None:
  """Writes tok to DIR/tokenizer.json atomically (a temporary file renamed into place)."""
  layout.write_atomically(layout.path(workdir, layout.TOKENIZER), tok.save)


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


def encode_document(tok: Tokenizer, text: str | bytes) -> list[int]:
  """[BOS] + ids of `text`: how every document, prompt and evaluation text starts (BOS is EOT for our own
  tokenizers). Bytes are decoded as UTF-8 with replacement characters."""
  if not isinstance(text, str):
    text = bytes(text).decode("utf-8", errors="replace")
  return [bos_id(tok), *encode(tok, text)]


def decode_completion(tok: Tokenizer, ids: Sequence[int]) -> str:
  """Text of generated ids, dropping a trailing end-of-document token."""
  ids = list(ids)
  if ids and ids[-1] == eot_id(tok):
    ids = ids[:-1]
  return decode(tok, ids)


def check_fits(tok: Tokenizer, config: ml_collections.ConfigDict, where: str) -> Tokenizer:
  """`tok` if it has its document tokens and at most config.model.vocab_size entries, else ValueError naming
  `where` it came from and the config key."""
  eot_id(tok)
  bos_id(tok)
  if tok.get_vocab_size() > config.model.vocab_size:
    raise ValueError(f"tokenizer {where} has {tok.get_vocab_size()} entries but config.model.vocab_size="
                     f"{config.model.vocab_size}; raise model.vocab_size or use a smaller tokenizer")
  return tok
