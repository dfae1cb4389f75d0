"""The compression case studies' model: small, and trained long enough that compression hurts as in the papers.

GPT-2 style, vocab 4096, width 128, 4 layers, 4 heads, context 128 (1.33M parameters), 4,000 steps of 16 x 128
tokens (8.2M tokens, about 6 per parameter) on the stdlib corpus: about 13 minutes on 2 CPU cores. The default
model (4.3M parameters, 1.2M tokens) is too far from convergence for compression to hurt: magnitude pruning at 50%
cost it 3% perplexity and GPTQ 4-bit tied round-to-nearest. Trained this long, magnitude 50% costs 1.20x against
SparseGPT's 1.12x, and 3-bit RTN 1.12x against GPTQ's 1.05x (README, case study 1).

  python -m train --config=configs/case_study.py --workdir=runs/case_study
  python -m scripts.case_study_sparsegpt --workdir=runs/case_study
"""

from configs import base


def get_config():
  c = base.get_config()
  c.model.update(family="gpt", vocab_size=4096, num_layers=4, embed_dim=128, num_heads=4, max_len=128)
  c.data.update(seq_len=128)
  c.train.update(batch_size=16, steps=4000, learning_rate=3e-3, warmup_steps=100, eval_every=1000, eval_batches=8,
                 checkpoint_every=1000)
  return c
