"""Data pipeline and tokenizer: splits, errors, packed batch format, chunking, checkpointable iterator state."""

import hashlib
import json
import os
import random

import numpy as np
import pytest

from configs import base
from train import data
from train import bpe
from workdir import tokenizer as tl

VOCAB = 320
WORDS = ["def", "return", "self", "class", "import", "  ", "\t", "\n", "für", "naïve", "日本", "🙂", "x = 1", "(", ")"]


def _doc(rng: random.Random, n_words: int) -> str:
  return " ".join(rng.choice(WORDS) for _ in range(n_words))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  """40 small UTF-8 documents (2 long ones) in nested dirs, plus a non-UTF-8 and an empty file (both skipped)."""
  root = tmp_path_factory.mktemp("corpus")
  rng = random.Random(0)
  texts = {}
  for i in range(40):
    rel = f"{'ab'[i % 2]}/sub{i % 3}/doc{i:02d}.txt"
    texts[rel] = _doc(rng, 600 if i < 2 else rng.randint(5, 80))
    (root / rel).parent.mkdir(parents=True, exist_ok=True)
    (root / rel).write_text(texts[rel], encoding="utf-8")
  (root / "a" / "latin1.txt").write_bytes("caf\xe9 cr\xe8me".encode("latin-1"))
  (root / "a" / "empty.txt").write_bytes(b"")
  return root, texts


def _config(corpus_root, data_dir, **data_overrides):
  c = base.get_config()
  c.model.vocab_size = VOCAB
  c.train.batch_size = 4
  c.data.update(source=f"files:{corpus_root}/**/*.txt", data_dir=str(data_dir), validation_fraction=0.25, seq_len=32)
  c.data.update(**data_overrides)
  return base.validate(c)


@pytest.fixture(scope="module")
def env(corpus, tmp_path_factory):
  """(config, sources, tokenizer) over the corpus, prepared once for the module."""
  root, _ = corpus
  config = _config(root, tmp_path_factory.mktemp("tfds"))
  sources = data.load_sources(config)
  tok = bpe.load_or_train(config, str(tmp_path_factory.mktemp("workdir")), sources["train"])
  return config, sources, tok


def _take(it, n):
  return [next(it) for _ in range(n)]


def _assert_same_batches(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)
      assert x[k].dtype == y[k].dtype


def _segments(batch):
  """Token sequences of the packed segments (inputs + last target), row by row."""
  out = []
  for inp, tgt, seg in zip(batch["inputs"], batch["targets"], batch["segment_ids"]):
    for s in np.unique(seg[seg > 0]):
      idx = np.flatnonzero(seg == s)
      out.append(tuple(inp[idx].tolist()) + (int(tgt[idx[-1]]),))
  return out


# --- tokenizer ---------------------------------------------------------------------------------------------------

def test_tokenizer_round_trip_and_vocab_size(corpus):
  _, texts = corpus
  tok = bpe.train_tokenizer(texts.values(), VOCAB)
  assert tok.get_vocab_size() == VOCAB  # the corpus has enough pairs to fill the budget, never more
  assert tl.eot_id(tok) == 0
  samples = ["def f(x):\n\treturn x  # ünïcödé ✓\n", "   leading spaces", "\t\ttabs\n\n\nnewlines  ", "日本語 🙂🚀 ∑",
             "\r\nwindows\r\n", "", "a" * 500, "\x00\x01 ctrl \u00a0nbsp \u2028", "ends with space "]
  for s in samples:
    ids = tl.encode(tok, s)
    assert all(0 <= i < VOCAB for i in ids)
    assert tl.decode(tok, ids) == s
  assert tl.decode(tok, [0]) == tl.EOT
  with pytest.raises(ValueError, match="vocab_size"):
    bpe.train_tokenizer(["abc"], 100)


def test_load_or_train_saves_reuses_and_checks(env, tmp_path):
  config, sources, _ = env
  tok = bpe.load_or_train(config, str(tmp_path), sources["train"])
  assert (tmp_path / "tokenizer.json").is_file()
  again = bpe.load_or_train(config, str(tmp_path))  # no source needed: the saved file is reused
  assert again.get_vocab() == tok.get_vocab()
  small = config.copy_and_resolve_references()
  small.model.vocab_size = 300
  with pytest.raises(ValueError, match="model.vocab_size=300"):
    bpe.load_or_train(small, str(tmp_path))
  missing = config.copy_and_resolve_references()
  missing.data.tokenizer_path = str(tmp_path / "nope.json")
  with pytest.raises(FileNotFoundError, match="data.tokenizer_path"):
    bpe.load_or_train(missing, str(tmp_path))
  given = config.copy_and_resolve_references()
  given.data.tokenizer_path = str(tmp_path / "tokenizer.json")
  assert bpe.load_or_train(given, str(tmp_path / "other")).get_vocab() == tok.get_vocab()


# --- corpus, splits, errors ---------------------------------------------------------------------------------------

def test_split_is_deterministic_disjoint_and_follows_path_hash(corpus, env):
  _, texts = corpus
  config, sources, _ = env
  paths = {s: [src[i]["path"].decode() for i in range(len(src))] for s, src in sources.items()}
  train, val = set(paths["train"]), set(paths["validation"])
  assert len(train) == len(paths["train"]) and len(val) == len(paths["validation"])
  assert not train & val
  assert train | val == set(texts)  # the non-UTF-8 and the empty file are skipped
  for rel in texts:
    h = int(hashlib.sha1(rel.encode()).hexdigest()[:16], 16) / 2**64
    assert (rel in val) == (h < config.data.validation_fraction), rel
    assert data.split_of(rel, config.data.validation_fraction) == ("validation" if rel in val else "train")
  assert data.list_documents(config) == data.list_documents(config)
  for i in range(len(sources["train"])):
    rec = sources["train"][i]
    assert rec["text"].decode("utf-8") == texts[rec["path"].decode()]


def test_train_validation_and_test_folders_choose_the_split(tmp_path):
  """WikiText-style layouts: files under train/ train, under validation/, valid/ or test/ are scored; elsewhere the
  path hash decides."""
  assert data.split_of("train/a.txt", 0.99, by_folder=True) == "train"
  assert data.split_of("test/a.txt", 0.0, True) == data.split_of("valid/b/c.txt", 0.0, True) == "validation"
  assert data.split_of("validation/x.txt", 0.0, True) == "validation"
  assert data.split_of("test", 0.0, True) == "train" and data.split_of("other/test/a.txt", 0.0, True) == "train"
  assert data.split_of("test/a.txt", 0.0) == "train"  # the stdlib's test/ package is not a split
  for split, names in (("train", ["a", "b", "c"]), ("test", ["d"])):
    (tmp_path / split).mkdir()
    for name in names:
      (tmp_path / split / f"{name}.txt").write_text(f"text of {name} " * 20)
  from configs import tiny

  c = tiny.get_config()
  c.data.update(source=f"files:{tmp_path}", data_dir=str(tmp_path / "tfds"), tokenizer_train_bytes=10_000)
  sources = data.load_sources(c)
  assert sorted(sources["validation"][i]["path"].decode() for i in range(len(sources["validation"]))) == ["test/d.txt"]
  assert len(sources["train"]) == 3


def test_prepared_dataset_is_reused_and_options_get_their_own_dir(corpus, env, tmp_path):
  root, texts = corpus
  config, _, _ = env
  variants = os.path.join(data.data_dir(config), "text_files")
  files = {os.path.join(dp, f): os.stat(os.path.join(dp, f)).st_mtime_ns
           for dp, _, fs in os.walk(variants) for f in fs}
  data.load_sources(config)
  assert {p: os.stat(p).st_mtime_ns for p in files} == files
  assert len(os.listdir(variants)) == 1
  cut = config.copy_and_resolve_references()
  cut.data.max_doc_bytes = 50
  sources = data.load_sources(cut)
  assert len(os.listdir(variants)) == 2
  for i in range(len(sources["train"])):
    rec = sources["train"][i]
    raw = rec["text"]
    assert 0 < len(raw) <= 50 and texts[rec["path"].decode()].encode().startswith(raw)
    raw.decode("utf-8")  # cut on a character boundary


def test_skipped_files_are_reported_with_their_reasons(corpus, tmp_path, caplog):
  root, _ = corpus
  with caplog.at_level("WARNING", logger="train.data"):
    data.load_sources(_config(root, tmp_path / "tfds"))
  text = caplog.text
  assert "1 empty" in text and "1 not UTF-8" in text and "skipped" in text
  assert "a/empty.txt" in text and "a/latin1.txt" in text


def test_read_document_reads_a_bounded_prefix_and_names_what_it_skips(tmp_path):
  import threading

  result = {}
  reader = threading.Thread(target=lambda: result.update(zero=data.read_document("/dev/zero", 1000)), daemon=True)
  reader.start()
  reader.join(20)  # an unbounded read of an endless file would never return
  assert not reader.is_alive() and result["zero"] == ("\0" * 1000, None)
  cut = tmp_path / "cut.txt"
  cut.write_bytes("ab\u00e9".encode() + b"\xff" * 10)  # a 2-byte character cut by the limit; invalid bytes after it
  assert data.read_document(str(cut), 3) == ("ab", None)
  assert data.read_document(str(cut), 100) == ("", "not UTF-8")
  (tmp_path / "empty.txt").write_bytes(b"")
  assert data.read_document(str(tmp_path / "empty.txt"), 100) == ("", "empty")
  assert data.read_document(str(tmp_path / "missing.txt"), 100) == ("", "unreadable")


def test_clear_errors_for_bad_sources(corpus, tmp_path):
  root, _ = corpus
  cases = [(f"files:{root}/**/*.nomatch", "matches no files"),
           (f"files:{tmp_path}/missing/*.txt", "does not exist")]
  (tmp_path / "empty").mkdir()
  cases.append((f"files:{tmp_path}/empty", "matches no files"))
  for source, what in cases:
    with pytest.raises(FileNotFoundError) as e:
      data.load_sources(_config(root, tmp_path / "tfds", source=source))
    assert "config.data.source=" in str(e.value) and source in str(e.value) and what in str(e.value)
    assert "e.g. 'files:" in str(e.value)
  with pytest.raises(ValueError, match=r"'validation' split gets 0 .*data.validation_fraction"):
    data.load_sources(_config(root, tmp_path / "tfds", validation_fraction=1e-9))
  with pytest.raises(ValueError, match="config.data.source='tfds:no_such_dataset_xyz'"):
    data.load_sources(_config(root, tmp_path / "tfds", source="tfds:no_such_dataset_xyz"))


def test_stdlib_source_smoke(tmp_path):
  c = base.get_config()
  c.data.update(data_dir=str(tmp_path / "tfds"), max_docs=40, validation_fraction=0.2, seq_len=16,
                tokenizer_train_bytes=100_000)
  c.model.vocab_size = 300
  sources = data.load_sources(base.validate(c))
  paths = [src[i]["path"].decode() for src in sources.values() for i in range(len(src))]
  assert 30 <= len(paths) <= 40 and all(p.endswith(".py") and "site-packages" not in p for p in paths)
  tok = bpe.load_or_train(c, str(tmp_path / "work"), sources["train"])
  batch = next(data.make_iterator(c, sources["train"], tok, split="train"))
  assert batch["inputs"].shape == (8, 16) and batch["weights"].sum() > 0


# --- chunking and packed batches ----------------------------------------------------------------------------------

def test_chunks_reassemble_the_document(env):
  _, _, tok = env
  ids = np.arange(100, dtype=np.int32)
  for seq_len in (1, 7, 33, 99, 100, 200):
    chunks = data.chunk_ids(ids, seq_len)
    assert all(2 <= len(c) <= seq_len + 1 for c in chunks)
    assert all(c[0] == p[-1] for p, c in zip(chunks, chunks[1:]))  # one token of overlap
    np.testing.assert_array_equal(np.concatenate([chunks[0]] + [c[1:] for c in chunks[1:]]), ids)
  text = "héllo\n\tworld " * 40
  pieces = data.tokenize_document({"text": text.encode()}, tokenizer=tok, seq_len=16)
  full = [pieces[0]["inputs"][0]] + [int(t) for p in pieces for t in p["targets"]]
  assert full == [0, *tl.encode(tok, text), 0]
  assert all(p["inputs"].dtype == np.int32 and len(p["inputs"]) <= 16 for p in pieces)


def test_pipeline_reproduces_a_long_document_in_order(env):
  config, _, tok = env
  c = config.copy_and_resolve_references()
  c.train.batch_size = 1
  c.data.seq_len = 16
  text = "long document, ünïcode and\ttabs\n" * 20
  want = [0, *tl.encode(tok, text), 0]
  n_chunks = len(data.chunk_ids(np.asarray(want), 16))
  it = data.make_iterator(c, [{"text": text.encode()}], tok, split="validation")
  segments = [s for b in _take(it, n_chunks) for s in _segments(b)][:n_chunks]
  got = list(segments[0]) + [t for s in segments[1:] for t in s[1:]]
  assert got == want


def test_packed_batch_format_and_consistency(env):
  config, sources, tok = env
  batches = _take(data.make_iterator(config, sources["train"], tok, split="train"), 6)
  shape = (config.train.batch_size, config.data.seq_len)
  dtypes = {"inputs": np.int32, "targets": np.int32, "segment_ids": np.int32, "positions": np.int32,
            "weights": np.float32}
  saw_packing = saw_padding = False
  for b in batches:
    assert {k: (v.shape, v.dtype) for k, v in b.items()} == {k: (shape, np.dtype(t)) for k, t in dtypes.items()}
    seg, pos, inp, tgt, w = b["segment_ids"], b["positions"], b["inputs"], b["targets"], b["weights"]
    np.testing.assert_array_equal(w, (seg > 0).astype(np.float32))
    assert (inp[seg == 0] == 0).all() and (tgt[seg == 0] == 0).all() and (pos[seg == 0] == 0).all()
    for row in range(shape[0]):
      s, p, x, y = seg[row], pos[row], inp[row], tgt[row]
      real = s > 0
      assert real[0] and not (real[1:] & ~real[:-1]).any()  # padding only at the end of a row
      assert set(np.diff(s[real]).tolist()) <= {0, 1}  # segments 1, 2, 3, ... in order
      new = np.r_[True, s[1:] != s[:-1]]
      np.testing.assert_array_equal(p[real & new], 0)
      np.testing.assert_array_equal(p[1:][real[1:] & ~new[1:]], p[:-1][real[1:] & ~new[1:]] + 1)
      same = real[:-1] & (s[1:] == s[:-1])
      np.testing.assert_array_equal(y[:-1][same], x[1:][same])  # targets are inputs shifted by one
      saw_packing |= s.max() > 1
      saw_padding |= not real.all()
  assert saw_packing and saw_padding


def test_every_packed_segment_is_a_chunk_of_a_validation_document(env):
  config, sources, tok = env
  src = sources["validation"]
  chunks = set()
  for i in range(len(src)):
    for piece in data.tokenize_document(src[i], tokenizer=tok, seq_len=config.data.seq_len):
      chunks.add(tuple(piece["inputs"].tolist()) + (int(piece["targets"][-1]),))
  tokens = sum(len(c) - 1 for c in chunks)
  n_batches = 2 * tokens // (config.train.batch_size * config.data.seq_len) + 2  # > one pass despite padding
  segs = [s for b in _take(data.make_iterator(config, src, tok, split="validation"), n_batches) for s in _segments(b)]
  assert all(s in chunks for s in segs)
  assert chunks <= set(segs)  # every chunk of every document shows up


# --- iterator state, determinism, sharding ------------------------------------------------------------------------

@pytest.mark.parametrize("split", ["train", "validation"])
def test_iterator_state_round_trip_is_exact(env, split):
  config, sources, tok = env
  it = data.make_iterator(config, sources[split], tok, split=split)
  _take(it, 3)
  state = it.get_state()
  state = json.loads(json.dumps(state))  # what grain.checkpoint writes
  want = _take(it, 5)
  fresh = data.make_iterator(config, sources[split], tok, split=split)
  fresh.set_state(state)
  _assert_same_batches(want, _take(fresh, 5))


def test_iterator_state_round_trip_with_worker_processes(env):
  config, sources, tok = env
  c = config.copy_and_resolve_references()
  c.data.num_workers = 1
  it = data.make_iterator(c, sources["train"], tok, split="train")
  _take(it, 2)
  state = it.get_state()
  want = _take(it, 3)
  fresh = data.make_iterator(c, sources["train"], tok, split="train")
  fresh.set_state(state)
  got = _take(fresh, 3)
  it.close()
  fresh.close()
  _assert_same_batches(want, got)


def test_validation_is_deterministic_and_train_is_shuffled(env):
  config, sources, tok = env
  a = _take(data.make_iterator(config, sources["validation"], tok, split="validation"), 4)
  b = _take(data.make_iterator(config, sources["validation"], tok, split="validation"), 4)
  _assert_same_batches(a, b)
  t0 = _take(data.make_iterator(config, sources["train"], tok, split="train"), 2)
  _assert_same_batches(t0, _take(data.make_iterator(config, sources["train"], tok, split="train"), 2))
  other = config.copy_and_resolve_references()
  other.data.shuffle_seed = 1
  t1 = _take(data.make_iterator(other, sources["train"], tok, split="train"), 2)
  assert any(not np.array_equal(x["inputs"], y["inputs"]) for x, y in zip(t0, t1))


def test_shards_split_rows_and_documents(env):
  config, sources, tok = env
  src = sources["validation"]
  shard_segs = []
  for i in range(2):
    b = next(data.make_iterator(config, src, tok, split="validation", shard_index=i, shard_count=2))
    assert b["inputs"].shape == (config.train.batch_size // 2, config.data.seq_len)
    shard_segs.append({s for s in _segments(b) if s[0] == 0})  # document starts
  assert shard_segs[0] and shard_segs[1] and not shard_segs[0] & shard_segs[1]
  with pytest.raises(ValueError, match="divisible"):
    data.make_iterator(config, src, tok, split="validation", shard_index=0, shard_count=3)


def test_tfds_source_reads_a_prepared_dataset_from_data_dir(env):
  """The `tfds:NAME:CONFIG` branch, offline: tfds finds our own prepared TextFiles variant in data.data_dir."""
  config, sources, tok = env
  name = data.text_files_builder(config).builder_config.name
  c = config.copy_and_resolve_references()
  c.data.source = f"tfds:text_files:{name}"
  tf_sources = data.load_sources(c)
  for split in data.SPLITS:
    assert len(tf_sources[split]) == len(sources[split])
    assert tf_sources[split][0] == {"text": sources[split][0]["text"]}
  _assert_same_batches(_take(data.make_iterator(c, tf_sources["validation"], tok, split="validation"), 2),
                       _take(data.make_iterator(config, sources["validation"], tok, split="validation"), 2))
