"""Inference: the sampler, loading workdirs, generation with a KV cache, evaluation, int8 quantization,
compression (`compress/`) and serving (engine, scheduler, HTTP server)."""
