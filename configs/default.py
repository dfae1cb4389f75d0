"""The README's main job: a GPT-2-style model on the Python standard library, <= 15 minutes on 2 CPU cores."""

from configs import base


def get_config():
  c = base.get_config()
  c.model.update(vocab_size=8192, num_layers=6, embed_dim=384, num_heads=6, max_len=256)
  c.data.update(seq_len=256)
  c.train.update(batch_size=8, steps=800, learning_rate=1e-3, warmup_steps=50, eval_every=200, checkpoint_every=200)
  return c
