"""The README's main job: a GPT-2-style model (4.3M parameters) on the Python standard library.

Sized for the 15-minute budget on 2 CPU cores (about 2,000 tokens/s there): 600 steps of 8 x 256 tokens (1.2M
tokens). On an accelerator, prefer `gpt2_124m.py`, or raise `train.steps` and the model size here.
"""

from configs import base


def get_config():
  c = base.get_config()
  c.model.update(family="gpt", vocab_size=4096, num_layers=4, embed_dim=256, num_heads=4, max_len=256)
  c.data.update(seq_len=256)
  c.train.update(batch_size=8, steps=600, learning_rate=2e-3, warmup_steps=50, eval_every=200, eval_batches=8,
                 checkpoint_every=200)
  return c
