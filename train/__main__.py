"""`python -m train --config=configs/tiny.py --workdir=DIR [--config.a.b=v ...]`: train, evaluate, print a sample.

An entry point: it composes the trainer with inference's closing sample (`infer.generate.closing_sample`), as
the layers below it may not."""

import os
import signal
import sys

from train import allocator

allocator.reexec_with_tcmalloc("train")  # before anything heavy is imported (train/allocator.py)


def _exit_at_once(signum, _frame):
  """While the modules load (nothing written yet), and on a second signal: end the process at once, with one line."""
  sys.stderr.write(f"stopped by signal {signum}: exiting at once\n")
  os._exit(128 + signum)


for _sig in (signal.SIGINT, signal.SIGTERM):
  signal.signal(_sig, _exit_at_once)

import logging  # noqa: E402

import tensorflow_datasets as tfds  # noqa: E402
from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from infer import generate  # noqa: E402
from train import distributed, trainer  # noqa: E402
from workdir import checkpoint  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", "configs/default.py", "Preset config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory (metrics, checkpoints, tokenizer); resumes if it "
                               "already holds a checkpoint.", required=True)


class _Interrupted(Exception):
  def __init__(self, signum: int):
    super().__init__(signum)
    self.signum = signum


def _interrupt(signum, _frame):
  """Outside the training loop (data preparation, tokenizer, compilation, final evaluation): the first signal
  unwinds cleanly (files are written atomically, so nothing half-written stays), a second one exits at once."""
  signal.signal(signal.SIGINT, _exit_at_once)
  signal.signal(signal.SIGTERM, _exit_at_once)
  raise _Interrupted(signum)


def main(argv):
  del argv
  for sig in (signal.SIGINT, signal.SIGTERM):  # the training loop installs its own handler (save, then stop)
    signal.signal(sig, _interrupt)
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
  logging.getLogger("absl").setLevel(logging.ERROR)  # tfds/jax chatter (custom-config notes, missing libtpu)
  tfds.disable_progress_bar()
  try:
    distributed.initialize(_CONFIG.value.distributed)
    summary = trainer.run(_CONFIG.value, _WORKDIR.value, closing_sample=generate.closing_sample)
  except (ValueError, FileNotFoundError, FloatingPointError, checkpoint.DamagedCheckpoint) as e:
    sys.exit(f"error: {e}")
  except _Interrupted as e:
    sys.stderr.write(f"stopped by signal {e.signum} outside the training loop; checkpoints already written are "
                     "kept: run the same command again to resume\n")
    sys.exit(128 + e.signum)
  if summary["interrupted"]:
    print(f"stopped at step {summary['step']} (checkpoint saved); run the same command again to resume")
    return
  print(f"held-out loss {summary['eval_loss']:.4f}, perplexity {summary['eval_ppl']:.2f} after {summary['step']} "
        f"steps ({summary['parameters'] / 1e6:.1f}M parameters, {summary['tokens_per_sec']:,.0f} tokens/s, "
        f"MFU {summary['mfu']:.1%})")
  print("sample:\n" + summary.get("sample", ""))


if __name__ == "__main__":
  app.run(main)
