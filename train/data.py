"""Text corpus -> tfds array_record dataset -> grain pipeline of packed, checkpointable token batches.

Sources (`config.data.source`):
  * `stdlib`: the `.py` files of the running interpreter's standard library (no site-packages / dist-packages);
  * `files:GLOB`: the user's files (`**` recurses; a plain directory means every file below it);
  * `tfds:NAME[:CONFIG]`: a tfds catalog dataset via `tfds.data_source` (its `text` feature, or its only Text one).
The first two are prepared once by the `TextFiles` tfds builder into `data.data_dir` (array_record, no TensorFlow)
under a config name hashed from the source, the options and the files' sizes/mtimes, and reused afterwards.
Each file is one document: in a `files:` source, under a top folder named train/ or validation/ (or valid/, test/) it
belongs to that split (test counts as validation: the papers' perplexity protocol scores a test split); otherwise it is
in `validation` iff sha1(its relative path) < `data.validation_fraction` (see `split_of`);
files that are not UTF-8 or are empty are skipped; documents are cut to `data.max_doc_bytes` bytes.

Batches (`make_iterator`) are dicts of numpy arrays, all [rows, data.seq_len], rows = train.batch_size // shard_count:
  inputs int32, targets int32 (= next token of inputs, within a segment), segment_ids int32 (1, 2, ... per packed
  chunk; 0 = padding), positions int32 (0, 1, ... restarting in every segment), weights float32 (1 on real targets,
  0 on padding).
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import hashlib
import json
import logging
import os
import sysconfig
from collections.abc import Mapping, Sequence
from typing import Any

import grain
from absl import flags
import ml_collections
import numpy as np
import tensorflow_datasets as tfds
from tokenizers import Tokenizer

from train import sft
from workdir import tokenizer as tokenizer_lib

log = logging.getLogger(__name__)

FORMAT_VERSION = 1  # bump when the prepared records change; part of every TextFiles config name
DEFAULT_DATA_DIR = "~/.cache/peakllm/tfds"
SPLITS = ("train", "validation")
_GLOB_CHARS = frozenset("*?[")
# Documents tokenized ahead (threads share the GIL; one 256-token batch row is ~1 KB of text, a document ~17 KB):
# grain's default (16 threads, 500 documents) would spend seconds tokenizing before the first batch.
_READ_OPTIONS = grain.ReadOptions(num_threads=2, prefetch_buffer_size=8)


def data_dir(config: ml_collections.ConfigDict) -> str:
  """`data.data_dir`, or ~/.cache/peakllm/tfds when empty, with ~ expanded."""
  return os.path.expanduser(config.data.data_dir or DEFAULT_DATA_DIR)


FOLDER_SPLITS = {"train": "train", "validation": "validation", "valid": "validation", "test": "validation"}


def split_of(rel_path: str, validation_fraction: float, by_folder: bool = False) -> str:
  """With `by_folder`, the split named by rel_path's top folder (FOLDER_SPLITS) if it has one; else 'validation' if
  sha1(rel_path) read as a number in [0, 1) is below `validation_fraction`, else 'train'."""
  top, _, rest = rel_path.partition("/")
  if by_folder and rest and top in FOLDER_SPLITS:
    return FOLDER_SPLITS[top]
  h = int.from_bytes(hashlib.sha1(rel_path.encode("utf-8")).digest()[:8], "big") / 2.0**64
  return "validation" if h < validation_fraction else "train"


def _source_error(config, what: str, fix: str, exc=ValueError) -> Exception:
  return exc(f"config.data.source={config.data.source!r}: {what}; {fix}")


def _stdlib_files() -> tuple[str, list[str]]:
  root = sysconfig.get_paths()["stdlib"]
  found = []
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = [d for d in dirnames if d not in ("site-packages", "dist-packages", "__pycache__")]
    found.extend(os.path.join(dirpath, f) for f in filenames if f.endswith(".py"))
  return root, found


def _glob_files(config, pattern: str) -> tuple[str, list[str]]:
  pattern = os.path.abspath(os.path.expanduser(pattern))
  parts = pattern.split(os.sep)
  literal = parts[:next((i for i, part in enumerate(parts) if _GLOB_CHARS & set(part)), len(parts))]
  root = os.sep.join(literal) or os.sep
  if len(literal) == len(parts):  # no wildcard: a directory (all files below it) or a single file
    if os.path.isdir(root):
      pattern = os.path.join(root, "**", "*")
    else:
      root = os.path.dirname(root)
  if not os.path.isdir(root):
    raise _source_error(config, f"directory {root!r} does not exist",
                        "point data.source at existing text files, e.g. 'files:/path/to/dir/**/*.txt'",
                        FileNotFoundError)
  found = [p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p)]
  if not found:
    raise _source_error(config, f"the pattern {pattern!r} matches no files (is {root!r} empty?)",
                        "fix the glob (use '**' to recurse, e.g. 'files:/path/to/dir/**/*.txt') or add files",
                        FileNotFoundError)
  return root, found


def list_documents(config: ml_collections.ConfigDict) -> list[tuple[str, str]]:
  """(absolute path, relative POSIX path) of the files of a `stdlib` / `files:` source in a fixed hashed order,
  capped at `data.max_docs` (0 = all) - a stable pseudo-random sample. Raises if nothing matches."""
  src = config.data.source
  if src == "stdlib":
    root, found = _stdlib_files()
  elif src.startswith("files:"):
    root, found = _glob_files(config, src[len("files:"):])
  else:
    raise _source_error(config, "not a file source", "list_documents handles 'stdlib' and 'files:GLOB'")
  docs = sorted(((p, os.path.relpath(p, root).replace(os.sep, "/")) for p in found),
                key=lambda d: (hashlib.sha1(f"sample:{d[1]}".encode("utf-8")).digest(), d[1]))  # != split hash
  max_docs = config.data.get("max_docs", 0)
  return docs[:max_docs] if max_docs else docs


@dataclasses.dataclass
class TextFilesConfig(tfds.core.BuilderConfig):
  """TextFiles variant; `name` is a hash of everything below, so different corpora never share a directory."""
  source: str = ""
  validation_fraction: float = 0.02
  max_doc_bytes: int = 200_000
  max_docs: int = 0


class TextFiles(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """One example per UTF-8 file: {'text': Text (bytes when read back), 'path': Text (relative path)}."""

  VERSION = tfds.core.Version("1.0.0")
  code_path = None  # no checksums file next to the code; also skips tfds' lookup that needs importlib_resources

  def __init__(self, *, documents: Sequence[tuple[str, str]] = (), **kwargs):
    self._documents = list(documents)
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self, description=f"peakllm text files from {self.builder_config.source!r}",
        features=tfds.features.FeaturesDict({"text": tfds.features.Text(), "path": tfds.features.Text()}))

  def _split_generators(self, dl_manager):
    del dl_manager
    cfg = self.builder_config
    by_folder = cfg.source.startswith("files:")  # (the stdlib has a test/ package: it is not a split)
    by_split = {s: [d for d in self._documents if split_of(d[1], cfg.validation_fraction, by_folder) == s]
                for s in SPLITS}
    return {s: self._generate_examples(docs, cfg.max_doc_bytes) for s, docs in by_split.items()}

  def _generate_examples(self, documents, max_doc_bytes: int):
    skipped: dict[str, list[str]] = {"empty": [], "not UTF-8": [], "unreadable": []}
    for path, rel in documents:
      text, why = read_document(path, max_doc_bytes)
      if why:
        skipped[why].append(rel)
        continue
      yield rel, {"text": text, "path": rel}
    if any(skipped.values()):
      log.warning("%s: skipped %d of %d files (%s), e.g. %s", self.builder_config.source, sum(map(len,
                  skipped.values())), len(documents), ", ".join(f"{len(v)} {k}" for k, v in skipped.items() if v),
                  ", ".join(next(iter(v)) for v in skipped.values() if v))


def read_document(path: str, max_doc_bytes: int) -> tuple[str, str | None]:
  """(text of the file's first `max_doc_bytes` bytes, None), or ("", why it is skipped: "empty", "not UTF-8" or
  "unreadable"). Reads at most max_doc_bytes + 4 bytes, however large the file; a multi-byte character cut by the
  limit is dropped."""
  try:
    with open(path, "rb") as f:
      raw = f.read(max_doc_bytes + 4)
  except OSError:
    return "", "unreadable"
  head = raw[:max_doc_bytes]
  try:
    text = head.decode("utf-8")
  except UnicodeDecodeError as e:
    if len(raw) <= max_doc_bytes or e.start < len(head) - 3 or e.reason != "unexpected end of data":
      return "", "not UTF-8"
    text = head[:e.start].decode("utf-8")  # the limit cut a character
  return (text, None) if text else ("", "empty")


def text_files_builder(config: ml_collections.ConfigDict) -> TextFiles:
  """The (maybe not yet prepared) TextFiles builder of a `stdlib` / `files:` source; raises early on a source without
  files or a split without documents."""
  d = config.data
  if d.max_doc_bytes <= 0:
    raise ValueError(f"config.data.max_doc_bytes={d.max_doc_bytes!r} must be > 0")
  docs = list_documents(config)
  by_folder = d.source.startswith("files:")
  counts = {s: sum(split_of(rel, d.validation_fraction, by_folder) == s for _, rel in docs) for s in SPLITS}
  for split, n in counts.items():
    if not n:
      raise _source_error(config, f"the {split!r} split gets 0 of its {len(docs)} files at data.validation_fraction="
                          f"{d.validation_fraction}", "add files or change data.validation_fraction")
  options = dict(source=d.source, validation_fraction=float(d.validation_fraction), max_doc_bytes=int(d.max_doc_bytes),
                 max_docs=int(d.get("max_docs", 0)))
  fingerprint = [(rel, os.stat(p).st_size, os.stat(p).st_mtime_ns) for p, rel in docs]
  version = [FORMAT_VERSION] + (["folder splits"] if by_folder else [])  # files: sources split by folder since 12/2026
  digest = hashlib.sha1(json.dumps([version, options, fingerprint]).encode()).hexdigest()[:16]
  kind = "stdlib" if d.source == "stdlib" else "files"
  cfg = TextFilesConfig(name=f"{kind}_{digest}", version="1.0.0", description=d.source, **options)
  return TextFiles(config=cfg, data_dir=data_dir(config), file_format="array_record", documents=docs)


@dataclasses.dataclass(frozen=True)
class TextField:
  """Random-access view of a data source that keeps only one feature, as {'text': ...}."""
  source: Any
  key: str

  def __len__(self) -> int:
    return len(self.source)

  def __getitem__(self, index: int) -> dict[str, Any]:
    return {"text": self.source[index][self.key]}


def _tfds_sources(config) -> dict[str, Any]:
  spec = config.data.source[len("tfds:"):]
  name = spec.replace(":", "/", 1)
  try:
    splits = tfds.data_source(name, data_dir=data_dir(config))
  except Exception as e:  # pylint: disable=broad-except
    raise _source_error(config, f"tfds.data_source({name!r}) failed: {type(e).__name__}: {e}",
                        "check the catalog name/config; the first use needs internet, and some datasets need "
                        "TensorFlow to prepare (prepare them elsewhere into data.data_dir)") from e
  val_split = next((s for s in ("validation", "test") if s in splits), None)
  if "train" not in splits or val_split is None:
    raise _source_error(config, f"splits are {sorted(splits)}", "use a dataset with 'train' and 'validation'/'test'")
  features = splits["train"].dataset_info.features
  texts = [k for k, f in features.items() if isinstance(f, tfds.features.Text)]
  key = "text" if "text" in texts else (texts[0] if len(texts) == 1 else None)
  if key is None:
    raise _source_error(config, f"cannot pick the text feature among {sorted(features)}",
                        "use a dataset with one Text feature or one named 'text'")
  return {"train": TextField(splits["train"], key), "validation": TextField(splits[val_split], key)}


def load_sources(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """{'train': source, 'validation': source}: random-access data sources (len, [i]) of {'text': bytes, ...} records.

  A `stdlib` / `files:` source is prepared on first use (single process; on multi-host, call this on process 0 first
  when data.data_dir is shared) and reused afterwards. Raises ValueError / FileNotFoundError naming data.source."""
  if config.data.source.startswith("tfds:"):
    return _tfds_sources(config)
  if sft.is_sft(config):
    return sft.read_records(config.data.source[len(sft.PREFIX):], config.data.validation_fraction, split_of)
  builder = text_files_builder(config)
  builder.download_and_prepare(
      file_format="array_record",
      download_config=tfds.download.DownloadConfig(compute_stats=tfds.download.ComputeStatsMode.SKIP))
  sources = builder.as_data_source()
  for split in SPLITS:
    if not len(sources[split]):
      raise _source_error(config, f"the {split!r} split has 0 readable documents (not UTF-8 or empty files)",
                          "add UTF-8 text files or change data.validation_fraction")
  return {s: sources[s] for s in SPLITS}


def chunk_ids(ids: np.ndarray, seq_len: int) -> list[np.ndarray]:
  """Cuts `ids` [n] into pieces of at most seq_len + 1 tokens; piece k is ids[k*seq_len : (k+1)*seq_len + 1], so
  consecutive pieces share one token and every target survives. Pieces shorter than 2 tokens are dropped."""
  return [ids[i:i + seq_len + 1] for i in range(0, max(len(ids) - 1, 0), seq_len)]


def tokenize_document(record: Mapping[str, Any], *, tokenizer: Tokenizer, seq_len: int) -> list[dict[str, np.ndarray]]:
  """[BOS] + ids + [EOT] of record['text'] (both EOT for our own tokenizers), chunked by `chunk_ids`, as [{'inputs': [m] int32, 'targets': [m] int32}]."""
  ids = np.asarray([*tokenizer_lib.encode_document(tokenizer, record["text"]), tokenizer_lib.eot_id(tokenizer)],
                   dtype=np.int32)
  return [{"inputs": c[:-1], "targets": c[1:]} for c in chunk_ids(ids, seq_len)]


class _Flatten(grain.experimental.FlatMapTransform):
  """Emits the chunks of a document one by one (the list is built by `tokenize_document`)."""
  max_fan_out = 1 << 30  # only MapDataset flat maps use it; the iterator version has no limit

  def flat_map(self, element):
    return element


def _batch_row(packed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Packer output (inputs, targets, *_segment_ids, *_positions, and for SFT mask; [seq_len] each) -> one row of the
  batch format (weights: 1 on real targets, and for SFT only on the trained ones)."""
  weights = packed["targets_segment_ids"] > 0
  if "mask" in packed:
    weights = weights & (packed["mask"] > 0)
  return {
      "inputs": packed["inputs"].astype(np.int32),
      "targets": packed["targets"].astype(np.int32),
      "segment_ids": packed["inputs_segment_ids"].astype(np.int32),
      "positions": packed["inputs_positions"].astype(np.int32),
      "weights": weights.astype(np.float32),
  }


def _own_memory(batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  return {k: np.array(v) for k, v in batch.items()}


def make_dataset(config: ml_collections.ConfigDict, source, tokenizer: Tokenizer, *, split: str,
                 shard_index: int = 0, shard_count: int = 1) -> grain.IterDataset:
  """The grain pipeline behind `make_iterator` (same arguments); iterate it to get batches."""
  if split not in SPLITS:
    raise ValueError(f"split={split!r}; use one of {SPLITS}")
  d, batch_size = config.data, config.train.batch_size
  if not 0 <= shard_index < shard_count:
    raise ValueError(f"shard_index={shard_index} must be in [0, shard_count={shard_count})")
  if batch_size % shard_count:
    raise ValueError(f"config.train.batch_size={batch_size} must be divisible by the number of data shards "
                     f"(processes) {shard_count}")
  rows = batch_size // shard_count
  ds = grain.MapDataset.source(source)[shard_index::shard_count]
  if not len(ds):
    raise ValueError(f"data shard {shard_index}/{shard_count} of the {split!r} split of config.data.source="
                     f"{d.source!r} is empty ({len(source)} documents); use fewer processes or more data")
  train = split == "train"
  if train:
    ds = ds.shuffle(seed=d.shuffle_seed)  # reshuffled every epoch by the repeat below
  lengths, bins = {"inputs": d.seq_len, "targets": d.seq_len}, rows
  if sft.is_sft(config):  # one record per segment, with its loss mask; short records pack better over more bins
    bins = 8 * rows
    template = sft.chat_template(d.tokenizer_path, tokenizer)
    tokenize = functools.partial(sft.tokenize_record, tokenizer=tokenizer, template=template, seq_len=d.seq_len)
    lengths["mask"] = d.seq_len
  else:
    tokenize = functools.partial(tokenize_document, tokenizer=tokenizer, seq_len=d.seq_len)
  ds = ds.repeat().map(tokenize)
  it = grain.experimental.FlatMapIterDataset(ds.to_iter_dataset(_READ_OPTIONS), _Flatten())
  if train and d.shuffle_window > 1:  # spread the chunks of long documents over many batches
    it = grain.experimental.WindowShuffleIterDataset(it, window_size=d.shuffle_window, seed=d.shuffle_seed)
  it = grain.experimental.FirstFitPackIterDataset(
      it, length_struct=lengths, num_packing_bins=bins, seed=d.shuffle_seed, shuffle_bins=train)
  it = it.map(_batch_row).batch(rows, drop_remainder=True)
  if d.num_workers > 0:
    if not flags.FLAGS.is_parsed():  # grain reads its absl flags; outside absl.app (scripts, tests) keep defaults
      flags.FLAGS.mark_as_parsed()
    it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=d.num_workers))
    it = it.map(_own_memory)  # workers hand over shared-memory arrays; copy them so they can be freed at once
  return it


def make_iterator(config: ml_collections.ConfigDict, source, tokenizer: Tokenizer, *, split: str,
                  shard_index: int = 0, shard_count: int = 1) -> grain.DatasetIterator:
  """Endless iterator of packed batches (format in the module docstring) from `source` (one of `load_sources`).

  Documents are taken `shard_index::shard_count` (give each process its own shard; rows per batch =
  train.batch_size // shard_count), shuffled with data.shuffle_seed every epoch for 'train' and read in a fixed order
  for 'validation', and repeated forever. `get_state()` / `set_state()` restore the stream exactly (also with
  data.num_workers > 0); checkpoint it with grain.checkpoint.CheckpointSave / CheckpointRestore."""
  return iter(make_dataset(config, source, tokenizer, split=split, shard_index=shard_index, shard_count=shard_count))
