"""GPT-2 small (124M parameters): 12 layers, width 768, 12 heads, context 1024, vocab 50257, tied embeddings."""

from configs import base


def get_config():
  c = base.get_config()
  c.model.update(family="gpt", vocab_size=50257, num_layers=12, embed_dim=768, num_heads=12, max_len=1024,
                 dtype="bfloat16", remat="save_dots")
  c.data.update(seq_len=1024, tokenizer_train_bytes=30_000_000)
  c.train.update(batch_size=64, steps=20000, learning_rate=6e-4, warmup_steps=700, eval_every=1000,
                 checkpoint_every=1000)
  return c
