"""Entry points restart once on tcmalloc when the machine has it (train/allocator.py), and keep glibc's malloc when
asked to or when it is missing."""

import os
import subprocess
import sys

from train import allocator

PROBE = """
from train import allocator
allocator.reexec_with_tcmalloc("probe")
import os
maps = open("/proc/self/maps").read()
print("tcmalloc" if "tcmalloc" in maps else "glibc", os.environ.get("PEAKLLM_MALLOC", ""))
"""


def _run_probe(tmp_path, **env):
  (tmp_path / "probe.py").write_text(PROBE)
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  environ = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", allocator.ENV)}
  environ.update(env, PYTHONPATH=os.pathsep.join([str(tmp_path), root]))
  done = subprocess.run([sys.executable, "-m", "probe", "--flag=1"], cwd=tmp_path, env=environ, capture_output=True,
                        text=True, timeout=120)
  assert done.returncode == 0, done.stderr
  return done.stdout.split()


def test_the_probe_runs_on_tcmalloc_exactly_when_it_is_installed(tmp_path):
  got = _run_probe(tmp_path)
  if allocator.find_tcmalloc() is None:
    assert got == ["glibc"]  # nothing to preload: the command runs as it is
  else:
    assert got == ["tcmalloc", "tcmalloc"]  # restarted once with the library preloaded


def test_peakllm_malloc_system_keeps_glibc(tmp_path):
  assert _run_probe(tmp_path, PEAKLLM_MALLOC="system") == ["glibc", "system"]
