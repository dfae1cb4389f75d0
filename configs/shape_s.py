"""Shape S, the CPU performance yardstick of DESIGN.md: GPT-2 style, vocab 8192, width 384, 6 layers, 6 heads, MLP 4x,
context 256, tied embeddings (13.9M parameters), batch 8 x 256, AdamW."""

from configs import base


def get_config():
  c = base.get_config()
  c.model.update(family="gpt", vocab_size=8192, num_layers=6, embed_dim=384, num_heads=6, max_len=256,
                 tie_embeddings=True)
  c.data.update(seq_len=256)
  c.train.update(batch_size=8, optimizer="adamw", steps=1000, warmup_steps=100)
  return c
