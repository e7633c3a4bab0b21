"""cortex's own engine: a compact Llama-family implementation with a paged KV cache,
continuous batching, sampling, cancellation and load-time quantization.

    checkpoint.py   config.json + safetensors → ModelSpec and tensors (ModelOpt exports too)
    gguf.py         GGUF files → the same (llama.cpp names and layouts, dequantized)
    quant.py        QuantLinear: one layer type over plain / int8 / int4 / fp8 weights
    parallel.py     tensor parallel: which rows / columns a rank holds, process group, all-reduce
    ranks.py        a tp model's processes: rank 0 drives the worker ranks, watchdog, stop
    llama.py        the model (Llama, Mistral, Qwen2, Qwen3 differ in a few switches)
    kernels/        its fused operations: Triton kernels for GPUs, plain-PyTorch references
    graphs.py       CUDA graphs of the decode step at bucketed batch sizes
    kv_cache.py     block pool, per-sequence block tables, the prefix cache
    sampling.py     greedy, temperature, top-k, top-p, seeded generators
    scheduler.py    the continuous-batching loop (no Triton in it: testable on its own)
    triton_model.py the Triton Python-backend glue (tensor names of TensorRT-LLM's model)
"""
