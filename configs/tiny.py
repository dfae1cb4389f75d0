"""Tiny preset for tests and smoke runs: trains in well under a minute on 2 CPU cores."""

from configs import base


def get_config():
  c = base.get_config()
  c.model.update(vocab_size=512, num_layers=2, embed_dim=64, num_heads=4, max_len=64)
  c.data.update(seq_len=64, tokenizer_train_bytes=1_000_000, shuffle_window=256)
  c.train.update(batch_size=8, steps=60, learning_rate=3e-3, warmup_steps=10, log_every=10, eval_every=30,
                 eval_batches=2, checkpoint_every=30, progress_bar=False)
  c.sample.update(max_new_tokens=16)
  return c
