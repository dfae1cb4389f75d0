"""Llama-3.2-1B shape: 16 layers, width 2048, 32 heads / 8 kv heads, SwiGLU 8192, vocab 128256, tied embeddings."""

from configs import base


def get_config():
  c = base.get_config()
  c.model.update(family="llama", vocab_size=128256, num_layers=16, embed_dim=2048, num_heads=32, num_kv_heads=8,
                 mlp_dim=8192, max_len=2048, rope_theta=500000.0, norm_eps=1e-5, tie_embeddings=True,
                 dtype="bfloat16", remat="save_dots")
  c.data.update(seq_len=2048, tokenizer_train_bytes=30_000_000)
  c.train.update(batch_size=32, steps=20000, learning_rate=3e-4, warmup_steps=1000, eval_every=1000,
                 checkpoint_every=1000)
  return c
