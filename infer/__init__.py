"""Inference: loading trained workdirs, generation with a KV cache, evaluation."""
