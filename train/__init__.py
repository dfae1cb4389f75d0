"""Training: data pipeline, tokenizer, pure steps, optimizer, checkpoints, metrics and the loop that ties them."""
