"""`cortex build-engine`: turn a Hugging Face checkpoint into a model a neuron can serve.

The pipeline is a list of resumable stages (`pipeline.plan`), each a plain function over plain
data that writes one folder under `STORE/.work/NAME/`:

    inspect    hash the source checkpoint (architecture, sizes and limits are read up front)
    quantize   NVIDIA ModelOpt FP8 or INT4-AWQ, calibrated on local text (never a download)
    export     a TensorRT-LLM checkpoint at the asked tp/pp, or (engine torch) a quantized
               Hugging Face checkpoint that the torch engine loads
    build      `trtllm-build` with explicit flags (only where TensorRT-LLM is installed)
    verify     the produced config.json says what was asked
    publish    an atomic rename into `STORE/NAME/`: engine or checkpoint, tokenizer, a filled
               Triton model directory, manifest.json and a models.toml entry

Modules: `request` (what was asked), `checkpoint` (reading and refusing checkpoints),
`calibration` (local text → token windows, and the shipped set), `quantize` (ModelOpt),
`trtllm` (build command, engine checks), `versions` (target TensorRT-LLM / Triton, installed
tools), `triton_model` (the `tensorrt_llm` template), `publish`, `stages` (resumable execution),
`pipeline` (the plan), `progress` (rich bars), `cli` (the typer command), `errors`.
"""
