"""The package layering holds: configs -> model -> workdir -> train -> infer -> scripts (an arrow means "may be
imported by"), with no import cycles between modules, and project imports inside functions nowhere. Read from the
source with `ast`, so the test needs no imports of its own and names the offending edge."""

import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAYERS = ("configs", "model", "workdir", "train", "infer", "scripts")  # lowest first


def _module_name(path: str) -> str:
  rel = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
  return rel[:-len(".__init__")] if rel.endswith(".__init__") else rel


def _modules() -> dict[str, str]:
  """module name -> file path for every .py file of the layered packages."""
  found = {}
  for package in LAYERS:
    for dirpath, _, files in os.walk(os.path.join(ROOT, package)):
      for f in files:
        if f.endswith(".py"):
          found[_module_name(os.path.join(dirpath, f))] = os.path.join(dirpath, f)
  return found


def _project_imports(path: str, modules) -> list[tuple[str, int, bool]]:
  """(imported project module, line, inside a function) for every import in `path`. `from a import b` names the
  module a.b when that is a module, else a."""
  tree = ast.parse(open(path, encoding="utf-8").read(), path)
  out = []

  def visit(node, in_function):
    for child in ast.iter_child_nodes(node):
      nested = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
      if isinstance(child, ast.Import):
        out.extend((a.name, child.lineno, in_function) for a in child.names if a.name.split(".")[0] in LAYERS)
      elif isinstance(child, ast.ImportFrom) and child.module and child.level == 0:
        if child.module.split(".")[0] in LAYERS:
          for a in child.names:
            name = f"{child.module}.{a.name}"
            out.append((name if name in modules else child.module, child.lineno, in_function))
      visit(child, nested)

  visit(tree, False)
  return out


def _graph():
  modules = _modules()
  return modules, {m: _project_imports(p, modules) for m, p in modules.items()}


def _layer(module: str) -> int:
  return LAYERS.index(module.split(".")[0])


def test_no_module_imports_from_a_layer_above_it():
  modules, graph = _graph()
  upward = [f"{m} (line {line}) imports {target}: {LAYERS[_layer(m)]} sits below {LAYERS[_layer(target)]}"
            for m, edges in graph.items() for target, line, _ in edges
            if _layer(target) > _layer(m) and not m.endswith("__main__")]
  # Command-line entry points (`python -m train`) compose the layers below them, as scripts do.
  assert not upward, "\n".join(upward)


def test_no_project_imports_inside_functions():
  _, graph = _graph()
  inside = [f"{m} (line {line}) imports {target} inside a function" for m, edges in graph.items()
            for target, line, in_function in edges if in_function]
  assert not inside, "\n".join(inside)


def test_no_import_cycles():
  modules, graph = _graph()
  edges = {m: sorted({t for t, _, _ in graph[m] if t in modules and t != m}) for m in modules}
  state, stack = {}, []

  def walk(m):
    state[m] = "open"
    stack.append(m)
    for t in edges[m]:
      if state.get(t) == "open":
        cycle = stack[stack.index(t):] + [t]
        pytest.fail("import cycle: " + " -> ".join(cycle))
      if t not in state:
        walk(t)
    stack.pop()
    state[m] = "done"

  for m in sorted(modules):
    if m not in state:
      walk(m)


def test_the_checker_sees_an_upward_import_and_a_cycle(tmp_path, monkeypatch):
  """The rules above can fail: a model module importing train, and two modules importing each other."""
  for package in ("model", "train"):
    os.makedirs(tmp_path / package)
    (tmp_path / package / "__init__.py").write_text("")
  (tmp_path / "model" / "bad.py").write_text("from train import loop\n")
  (tmp_path / "train" / "loop.py").write_text("from train import other\n")
  (tmp_path / "train" / "other.py").write_text("def f():\n  from train import loop\n")
  monkeypatch.setattr(__import__(__name__), "ROOT", str(tmp_path))
  with pytest.raises(AssertionError, match=r"model.bad \(line 1\) imports train.loop"):
    test_no_module_imports_from_a_layer_above_it()
  with pytest.raises(AssertionError, match=r"train.other \(line 2\) imports train.loop inside a function"):
    test_no_project_imports_inside_functions()
  (tmp_path / "train" / "other.py").write_text("from train import loop\n")
  with pytest.raises(pytest.fail.Exception, match=r"import cycle: train.loop -> train.other -> train.loop"):
    test_no_import_cycles()
