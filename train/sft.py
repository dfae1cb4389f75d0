"""Supervised fine-tuning data: JSONL records of prompt/completion pairs or chat messages, loss on the answers only.

`data.source = "sft:PATH"` (a .jsonl file, or a glob of them). Each line is one record, either
  {"prompt": str, "completion": str}: [BOS] + prompt + completion + [EOS], the loss on completion and EOS; or
  {"messages": [{"role": "system" | "user" | "assistant", "content": str}, ...]}: rendered with the chat template
  (`chat_template` of the tokenizer_config.json beside data.tokenizer_path, else `DEFAULT_CHAT_TEMPLATE`), the loss
  on each assistant turn's text and the end-of-turn tokens the template writes after it.
A record is one segment of a packed row (never split over rows); one longer than data.seq_len + 1 tokens keeps its
first seq_len + 1. Records go to the validation split by sha1 of "file:line" like documents (data.validation_fraction).
Bad lines (not JSON, missing or mistyped fields, nothing to learn) are skipped and reported with their line numbers.
"""

from __future__ import annotations

import glob
import json
import logging
import os
from typing import Any

import jinja2
import jinja2.sandbox
import numpy as np
from tokenizers import Tokenizer

from workdir import layout
from workdir import tokenizer as tokenizer_lib

log = logging.getLogger(__name__)

PREFIX = "sft:"
ROLES = ("system", "user", "assistant")
# Used when the tokenizer has no chat template (our own BPEs): a role header per turn, the end-of-document token
# closing each turn (so a fine-tuned model stops after its answer).
DEFAULT_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}{{ eos_token }}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")

Pieces = list[tuple[str, bool]]  # (text, trained on) in order; a record is the concatenation


def is_sft(config) -> bool:
  return config.data.source.startswith(PREFIX)


class ChatTemplate:
  """A Hugging Face chat template (Jinja, rendered as transformers does: sandboxed, trim_blocks, lstrip_blocks)."""

  def __init__(self, source: str, bos_token: str, eos_token: str):
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)

    def raise_exception(message):
      raise jinja2.exceptions.TemplateError(message)

    env.globals["raise_exception"] = raise_exception
    self.template = env.from_string(source)
    self.bos_token, self.eos_token = bos_token, eos_token

  def render(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
    return self.template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                bos_token=self.bos_token, eos_token=self.eos_token)

  def pieces(self, messages: list[dict]) -> Pieces:
    """The rendered conversation cut into (text, trained) pieces: each assistant turn's own text (what the template
    adds after the generation prompt) is trained on, everything else is context."""
    out: Pieces = []
    covered = ""
    for i, message in enumerate(messages):
      if message["role"] != "assistant":
        continue
      prompt = self.render(messages[:i], add_generation_prompt=True)
      upto = self.render(messages[:i + 1])
      if not (prompt.startswith(covered) and upto.startswith(prompt)):
        raise ValueError("the chat template does not render turns as prefixes of each other, so assistant turns "
                         "cannot be located")
      out += [(prompt[len(covered):], False), (upto[len(prompt):], True)]
      covered = upto
    rest = self.render(messages)[len(covered):]
    return out + [(rest, False)] if rest else out


def chat_template(tokenizer_path: str, tokenizer: Tokenizer) -> ChatTemplate:
  """The template of the tokenizer_config.json beside `tokenizer_path`, else DEFAULT_CHAT_TEMPLATE; its bos/eos
  strings are the tokenizer's document tokens."""
  bos = tokenizer.id_to_token(tokenizer_lib.bos_id(tokenizer))
  eos = tokenizer.id_to_token(tokenizer_lib.eot_id(tokenizer))
  config_path = os.path.join(os.path.dirname(tokenizer_path), layout.TOKENIZER_CONFIG) if tokenizer_path else ""
  source = None
  if config_path and os.path.isfile(config_path):
    source = layout.read_json(config_path).get("chat_template")
    if isinstance(source, list):  # several named templates: the default one
      source = next((t["template"] for t in source if t.get("name") == "default"), None)
  return ChatTemplate(source or DEFAULT_CHAT_TEMPLATE, bos, eos)


def _record_error(record: Any) -> str | None:
  """Why a parsed JSONL line is not a usable record, or None."""
  if not isinstance(record, dict):
    return "not a JSON object"
  if "messages" in record:
    messages = record["messages"]
    if not isinstance(messages, list) or not messages:
      return "'messages' must be a non-empty list"
    for j, m in enumerate(messages):
      if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
        return f"messages[{j}] must be {{'role': one of {', '.join(ROLES)}, 'content': str}}"
    if not any(m["role"] == "assistant" and m["content"] for m in messages):
      return "no assistant message with content (nothing to learn)"
    return None
  if not isinstance(record.get("prompt"), str) or not isinstance(record.get("completion"), str):
    return "needs 'prompt' and 'completion' strings, or 'messages'"
  if not record["completion"]:
    return "empty completion (nothing to learn)"
  return None


def read_records(pattern: str, validation_fraction: float, split_of) -> dict[str, list[dict]]:
  """{'train': [...], 'validation': [...]} records {'messages': [...]} or {'prompt', 'completion'} with 'where'
  ("file:line") from the JSONL files matching `pattern`; bad lines are logged with their line numbers and skipped.
  ValueError when no file matches or no line is usable."""
  files = sorted(p for p in glob.glob(os.path.expanduser(pattern), recursive=True) if os.path.isfile(p))
  if not files:
    raise FileNotFoundError(f"config.data.source={PREFIX}{pattern}: no file matches; give a JSONL file (one "
                            "{\"prompt\", \"completion\"} or {\"messages\"} object per line) or a glob of them")
  splits: dict[str, list[dict]] = {"train": [], "validation": []}
  bad: list[str] = []
  for path in files:
    name = os.path.basename(path)
    with open(path, encoding="utf-8", errors="replace") as f:
      for number, line in enumerate(f, start=1):
        if not line.strip():
          continue
        try:
          record = json.loads(line)
        except json.JSONDecodeError as e:
          bad.append(f"{name}:{number}: not JSON ({e.msg})")
          continue
        why = _record_error(record)
        if why:
          bad.append(f"{name}:{number}: {why}")
          continue
        where = f"{name}:{number}"
        kept = ({"messages": record["messages"]} if "messages" in record else
                {"prompt": record["prompt"], "completion": record["completion"]})
        splits[split_of(where, validation_fraction)].append({**kept, "where": where})
  if bad:
    log.warning("skipped %d bad SFT record(s) of %s:\n  %s%s", len(bad), pattern, "\n  ".join(bad[:20]),
                f"\n  ... and {len(bad) - 20} more" if len(bad) > 20 else "")
  total = len(splits["train"]) + len(splits["validation"])
  if not total:
    raise ValueError(f"config.data.source={PREFIX}{pattern}: no usable record ({len(bad)} bad lines, see above)")
  if not splits["validation"]:  # tiny files: hold out the last record so the trainer can evaluate
    splits["validation"].append(splits["train"].pop() if len(splits["train"]) > 1 else splits["train"][0])
  log.info("SFT records of %s: %d train, %d validation, %d skipped", pattern, len(splits["train"]),
           len(splits["validation"]), len(bad))
  return splits


def record_pieces(record: dict, template: ChatTemplate) -> tuple[Pieces, bool]:
  """(pieces, whether the BOS and final EOS tokens are to be added) of one record."""
  if "messages" in record:
    return template.pieces(list(record["messages"])), False  # the template writes its own special tokens
  return [(record["prompt"], False), (record["completion"], True)], True


def tokenize_record(record: dict, *, tokenizer: Tokenizer, template: ChatTemplate, seq_len: int
                    ) -> list[dict[str, np.ndarray]]:
  """One record -> [{'inputs', 'targets', 'mask'}] ([m] int32, m <= seq_len; mask 1 where the target is trained on),
  or [] when truncation leaves nothing to learn."""
  pieces, add_specials = record_pieces(record, template)
  ids, trained = [], []
  if add_specials:
    ids.append(tokenizer_lib.bos_id(tokenizer))
    trained.append(False)
  for text, learn in pieces:
    piece = tokenizer_lib.encode(tokenizer, text)
    ids += piece
    trained += [learn] * len(piece)
  if add_specials:
    ids.append(tokenizer_lib.eot_id(tokenizer))
    trained.append(True)
  ids, trained = ids[:seq_len + 1], trained[:seq_len + 1]
  mask = np.asarray(trained[1:], np.int32)
  if len(ids) < 2 or not mask.any():
    return []
  ids = np.asarray(ids, np.int32)
  return [{"inputs": ids[:-1], "targets": ids[1:], "mask": mask}]
