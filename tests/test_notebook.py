"""notebooks/quickstart.ipynb runs top to bottom in a fresh kernel (nbclient), as a Colab user runs it."""

import json
import pathlib

import nbclient
import nbformat

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_the_quickstart_notebook_runs_top_to_bottom(tmp_path, monkeypatch):
  workdir = tmp_path / "run"
  monkeypatch.setenv("PEAKLLM_NOTEBOOK_WORKDIR", str(workdir))
  monkeypatch.delenv("XLA_FLAGS", raising=False)  # one CPU device, as on a user's machine (conftest simulates 8)
  notebook = nbformat.read(ROOT / "notebooks" / "quickstart.ipynb", as_version=4)
  nbclient.NotebookClient(notebook, timeout=600, kernel_name="python3",
                          resources={"metadata": {"path": str(ROOT / "notebooks")}}).execute()
  text = "".join(out.get("text", "") for cell in notebook.cells if cell.cell_type == "code" for out in cell.outputs)
  assert "server exit code: 0" in text and "completion: " in text and "chat: " in text, text[-2000:]
  assert (workdir / "loss.png").stat().st_size > 0 and (workdir.parent / "run_int8" / "eval.json").exists()
  float_ppl = json.loads((workdir / "eval.json").read_text())["ppl"]
  int8_ppl = json.loads((workdir.parent / "run_int8" / "eval.json").read_text())["ppl"]
  assert 1 < float_ppl < 4096 and abs(int8_ppl / float_ppl - 1) < 0.02, (float_ppl, int8_ppl)
