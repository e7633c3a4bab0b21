"""Engines that run inside Triton's Python backend, one folder each, and the Triton-side glue
they share (`triton_glue`: the tensor contract read from a request, decoupled response sending,
cancellation, the cached-token output, the stats file the neuron reads), and what their
decoding shares: `guided` (llguidance grammars and per-step token masks) and `logprobs`.

    llamacpp/   GGUF files as they are, on llama.cpp (llama-cpp-python's low-level API)

The torch engine still lives in `neuron_agent/torch_engine/`.
"""
