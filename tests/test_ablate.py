"""The ablation script: each variant in its own process, JSON + markdown + plot, memory moving the right way."""

import json
import math
import os
import subprocess
import sys

import pytest

from configs import tiny
from scripts import ablate

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_ablate(out, *args):
  """`python -m scripts.ablate` on the tiny config, one round, into `out`; fails the test with its stderr."""
  cmd = [sys.executable, "-m", "scripts.ablate", "--config=configs/tiny.py", "--rounds=1", f"--out_dir={out}", *args]
  done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
  assert done.returncode == 0, done.stderr[-3000:]


def test_train_study_on_the_tiny_config_writes_json_table_and_plot(tmp_path):
  out = tmp_path / "ablations"
  run_ablate(out, "--study=train", "--steps=2", "--warmup=1", "--switches=model.remat=none|full")
  result = json.loads((out / "train.json").read_text())
  rows = {(r["switch"], str(r["value"])): r for r in result["rows"]}
  assert set(rows) == {("baseline", ""), ("model.remat", "full")}  # remat=none is
  for row in rows.values():  # the baseline's own value, so it is not run twice
    for key in ("tokens_per_s", "step_s", "compile_s", "temp_mib", "peak_rss_mib", "quality"):
      assert math.isfinite(row[key]) and row[key] > 0, (key, row)
    assert math.isclose(row["tokens_per_s_x"], row["tokens_per_s"] / rows[("baseline", "")]["tokens_per_s"])
  # full remat keeps only the block inputs for the backward pass: fewer compiled temporaries than storing everything
  assert rows[("model.remat", "full")]["temp_mib"] < rows[("baseline", "")]["temp_mib"]
  # the same model and data: one-switch changes that do not alter the math leave the loss where it was
  assert rows[("model.remat", "full")]["quality"] == pytest.approx(rows[("baseline", "")]["quality"], rel=1e-4)
  table = (out / "train.md").read_text()
  assert "| model.remat | full |" in table
  assert (out / "train.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_unknown_switches_and_values_are_refused_with_the_allowed_list():
  config = tiny.get_config()
  with pytest.raises(ValueError, match="'model.bogus' is not a switch of the train study; allowed: model.remat"):
    ablate.parse_switches("train", ["model.bogus"], config)
  with pytest.raises(ValueError, match="train.grad_accum_steps='two' is not a valid int"):
    ablate.parse_switches("train", ["train.grad_accum_steps=two"], config)
  runs = ablate.variants("train", ablate.parse_switches("train", ["train.grad_accum_steps=1|2|4"], config), config)
  assert [r["value"] for r in runs] == ["", 2, 4]  # the baseline's own value (1) is the baseline run
  # attention implementations run only when named (gpu_check.sh names them; interpret-mode kernels on CPU are slow)
  assert "model.attention_impl" not in ablate.parse_switches("train", [], config)
  assert ablate.parse_switches("train", ["model.attention_impl"], config) == {
      "model.attention_impl": ("xla", "pallas", "cudnn")}


def test_each_row_is_the_median_round_with_every_rounds_speed_kept():
  rounds = [{"tokens_per_s": 300.0, "quality": 1.0}, {"tokens_per_s": 100.0, "quality": 2.0},
            {"tokens_per_s": 200.0, "quality": 3.0}]
  row = ablate.combine(rounds)
  assert row["tokens_per_s"] == 200.0 and row["quality"] == 3.0 and row["tokens_per_s_rounds"] == [300.0, 100.0, 200.0]


def test_decode_study_measures_speed_memory_and_divergence_from_float32(tmp_path):
  out = tmp_path / "ablations"
  run_ablate(out, "--study=decode", "--decode_tokens=8", "--decode_repeats=1", "--switches=format=float32|int8")
  base, int8 = json.loads((out / "decode.json").read_text())["rows"]
  assert (base["switch"], int8["switch"], int8["value"]) == ("baseline", "format", "int8")
  assert base["quality"] < 1e-7 and 10 * base["quality"] < int8["quality"] < 0.05  # KL to float32: ~0 for float32
  # itself (other summation orders), small for int8
  assert int8["weight_mib"] < 0.6 * base["weight_mib"]
  assert all(math.isfinite(r[k]) and r[k] > 0 for r in (base, int8) for k in ("tokens_per_s", "ttft_s", "peak_rss_mib"))


def test_compress_study_makes_each_format_and_measures_perplexity_bits_and_speed(tiny_run, tmp_path):
  out = tmp_path / "ablations"
  run_ablate(out, "--study=compress", f"--workdir={tiny_run[0]}", "--switches=format=gptq4",
             "--compress_samples=8", "--eval_tokens=4096", "--decode_tokens=8", "--decode_repeats=1")
  rows = {r["value"] or "float32": r for r in json.loads((out / "compress.json").read_text())["rows"]}
  assert set(rows) == {"float32", "gptq4"}  # int8 and the other formats take the same path
  base = rows["float32"]
  assert base["bits_per_param"] == pytest.approx(32)
  assert rows["gptq4"]["bits_per_param"] < 20  # 4-bit codes plus grids beside the float32 embedding
  assert "4-bit codes" in rows["gptq4"]["weights_note"]  # served as stored
  for name, row in rows.items():
    assert math.isfinite(row["quality"]) and 1 < row["quality"] < 1.5 * base["quality"], (name, row["quality"])
    assert row["tokens_per_s"] > 0 and row["peak_rss_mib"] > 0
  assert rows["gptq4"]["compile_s"] > 0 and "compress s" in (out / "compress.md").read_text()
  assert (out / "compress.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_compress_and_serve_studies_need_a_trained_workdir(tmp_path, tiny_run):
  for study in ("compress", "serve"):
    with pytest.raises(FileNotFoundError, match=f"--study={study} needs --workdir=<a trained run>"):
      ablate.require_workdir(study, str(tmp_path))
  ablate.require_workdir("compress", tiny_run[0])
  ablate.require_workdir("train", "")  # the config studies need none


def test_serve_study_runs_the_server_at_each_batch_size(tiny_run, tmp_path):
  out = tmp_path / "ablations"
  run_ablate(out, "--study=serve", f"--workdir={tiny_run[0]}", "--switches=slots=1", "--serve_requests=8",
             "--serve_concurrency=4")
  rows = {(r["switch"], str(r["value"])): r for r in json.loads((out / "serve.json").read_text())["rows"]}
  assert set(rows) == {("baseline", ""), ("slots", "1")}
  assert [rows[k]["slots"] for k in (("slots", "1"), ("baseline", ""))] == [1, 8]
  for row in rows.values():
    for key in ("tokens_per_s", "step_s", "compile_s", "requests_per_s", "peak_rss_mib", "quality"):
      assert math.isfinite(row[key]) and row[key] > 0, (key, row)
  # four clients: one slot serves them one at a time, so the first token waits behind whole requests
  assert rows[("slots", "1")]["quality"] > rows[("baseline", "")]["quality"]
  assert "TTFT p50 (s)" in (out / "serve.md").read_text()
  assert (out / "serve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
