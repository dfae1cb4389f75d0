"""Post-training compression: calibration (`calibrate`), SparseGPT and GPTQ with their baselines (`sparsegpt`,
`gptq`, `obs`, `quantizer`), whole-model runs and compressed workdirs (`pipeline`, `storage`), and QMoE (`qmoe`,
`ternary_code`). `python -m infer.compress` is the command line."""
