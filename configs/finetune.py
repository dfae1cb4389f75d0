"""Fine-tune the model of a workdir (a training run, or a Hugging Face import written by `scripts/convert.py`):

  python -m train --config=configs/finetune.py:runs/opt --workdir=runs/opt-ft [--config.train.steps=...]

The model section and tokenizer come from that workdir, its latest parameters start the run (train.init_from), and
the optimizer restarts with a short warm-up at a fine-tuning learning rate on the configured data (the embedded
stdlib corpus by default).
"""

import json
import os

from configs import base


def get_config(source: str = ""):
  if not source:
    raise ValueError("configs/finetune.py needs the workdir to start from: --config=configs/finetune.py:DIR")
  path = os.path.join(source, "config.json")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path} not found: the workdir must come from `python -m train` or `scripts.convert`")
  with open(path, encoding="utf-8") as f:
    saved = json.load(f)
  c = base.get_config()
  c.model.update(saved["model"])
  c.data.tokenizer_path = os.path.join(source, "tokenizer.json")
  c.data.seq_len = min(256, c.model.max_len)
  c.train.update(init_from=source, steps=200, warmup_steps=20, learning_rate=3e-5, min_lr_ratio=0.1,
                 weight_decay=0.0, batch_size=8, eval_every=100, checkpoint_every=100)
  c.sample.prompt = "def "
  return c
