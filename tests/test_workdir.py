"""The workdir package: one owner of config.json, checkpoints and tokenizer files, so derived workdirs (quantized,
compressed) keep everything inference needs, the document tokens of imported tokenizers included."""

import json
import os
import shutil

import pytest

from configs import compress as compress_config
from infer import loading
from infer.compress import pipeline as compress
from infer.quantize import quantize_workdir
from workdir import layout
from workdir import tokenizer as tokenizer_lib


def _with_own_document_tokens(tiny_run, tmp_path) -> tuple[str, int, int]:
  """A copy of the tiny run whose tokenizer_config.json names other BOS/EOS tokens than <|endoftext|> (as imported
  OPT/Llama tokenizers do). Returns (workdir, bos id, eos id)."""
  src = str(tmp_path / "src")
  shutil.copytree(tiny_run[0], src)
  tok = tokenizer_lib.load_from(src)
  bos, eos = 300, 301
  with open(os.path.join(src, layout.TOKENIZER_CONFIG), "w", encoding="utf-8") as f:
    json.dump({"bos_token": tok.id_to_token(bos), "eos_token": tok.id_to_token(eos)}, f)
  assert (tokenizer_lib.bos_id(tokenizer_lib.load_from(src)), tokenizer_lib.eot_id(tokenizer_lib.load_from(src))) \
      == (bos, eos)
  return src, bos, eos


def test_quantized_and_compressed_workdirs_keep_the_tokenizers_document_tokens(tiny_run, tmp_path):
  src, bos, eos = _with_own_document_tokens(tiny_run, tmp_path)
  quantize_workdir(src, str(tmp_path / "int8"), "int8_weight")
  config, model, tokenizer, step = loading.load_trained(src)
  c = compress_config.get_config()
  c.method = "magnitude"
  compress.compress_workdir(config, model, tokenizer, step, c, source_workdir=src, out=str(tmp_path / "pruned"))
  for out in ("int8", "pruned"):
    _, _, tok, _ = loading.load_trained(str(tmp_path / out))
    assert (tokenizer_lib.bos_id(tok), tokenizer_lib.eot_id(tok)) == (bos, eos), out
    assert tokenizer_lib.encode_document(tok, "def f")[0] == bos


def test_a_derived_workdir_never_overwrites_a_non_empty_directory(tiny_run, tmp_path):
  out = tmp_path / "taken"
  out.mkdir()
  (out / "keep.txt").write_text("mine")
  with pytest.raises(FileExistsError, match="exists and is not empty"):
    layout.new_derived(str(out), tiny_run[0], layout.load_config(tiny_run[0]))
  assert (out / "keep.txt").read_text() == "mine" and sorted(os.listdir(out)) == ["keep.txt"]


def test_config_round_trips_and_a_missing_one_is_named(tiny_run, tmp_path):
  config = layout.load_config(tiny_run[0])
  layout.write_config(config, str(tmp_path / "w"))
  assert layout.load_config(str(tmp_path / "w")).to_dict() == config.to_dict()
  with pytest.raises(FileNotFoundError, match=r"config.json not found"):
    layout.load_config(str(tmp_path / "nothing"))
  with pytest.raises(FileNotFoundError, match=r"tokenizer.json not found"):
    tokenizer_lib.load_from(str(tmp_path / "nothing"))


def test_documents_prompts_and_evaluation_share_one_encoding_rule(tiny_run):
  tok = tokenizer_lib.load_from(tiny_run[0])
  ids = tokenizer_lib.encode_document(tok, "import os")
  assert ids == [tokenizer_lib.bos_id(tok), *tokenizer_lib.encode(tok, "import os")]
  assert tokenizer_lib.encode_document(tok, "import os".encode()) == ids  # records arrive as bytes from tfds
  assert tokenizer_lib.decode_completion(tok, [*ids[1:], tokenizer_lib.eot_id(tok)]) == "import os"


def _snapshot(directory: str) -> dict:
  """Every file under `directory` with its bytes and modification time."""
  out = {}
  for root, _, files in os.walk(directory):
    for name in files:
      p = os.path.join(root, name)
      with open(p, "rb") as f:
        out[os.path.relpath(p, directory)] = (f.read(), os.stat(p).st_mtime_ns)
  return out


def test_a_changed_config_on_an_existing_workdir_is_refused_before_anything_is_touched(tmp_path):
  from conftest import tiny_config
  from train import trainer

  workdir = str(tmp_path / "run")
  os.makedirs(workdir)
  old = tiny_config(str(tmp_path / "data"))
  layout.write_config(old, workdir)
  with open(os.path.join(workdir, "metrics.jsonl"), "w", encoding="utf-8") as f:
    f.write('{"step": 10, "loss": 5.0}\n')
  before = _snapshot(workdir)
  new = tiny_config(str(tmp_path / "data"))
  new.model.embed_dim, new.model.dtype = old.model.embed_dim * 2, "bfloat16"
  new.data.source, new.train.learning_rate = "files:/tmp/*.py", old.train.learning_rate / 2
  new.train.steps, new.train.eval_every, new.mesh.data = old.train.steps + 100, 7, -1  # these may change
  with pytest.raises(ValueError) as e:
    trainer.run(new, workdir)
  message = str(e.value)
  for key, value in (("model.embed_dim", new.model.embed_dim), ("model.dtype", "bfloat16"),
                     ("data.source", "files:/tmp/*.py"), ("train.learning_rate", new.train.learning_rate)):
    assert f"{key}: {old[key.split('.')[0]][key.split('.')[1]]!r} -> {value!r}" in message
  assert "train.steps:" not in message and "mesh.data" not in message.split("(only")[0]
  assert _snapshot(workdir) == before
  old.train.steps, old.train.log_every, old.mesh.data = 5, 1, 2  # allowed on resume
  layout.check_resumable(workdir, old)


@pytest.mark.parametrize("key,value", [("train.learning_rate", float("nan")), ("model.norm_eps", float("inf")),
                                       ("train.grad_clip", float("-inf"))])
def test_validate_refuses_non_finite_numbers(key, value):
  from configs import base

  c = base.get_config()
  section, name = key.split(".")
  c[section][name] = value
  with pytest.raises(ValueError, match=f"config.{key}={value!r} is invalid: must be a finite number"):
    base.validate(c)
