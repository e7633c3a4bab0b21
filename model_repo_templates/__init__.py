"""Triton model-directory templates that the neuron agent fills from a model's profile.

torch_llm/      our torch engine (Python backend), TensorRT-LLM's tensor names
tensorrt_llm/   the `tensorrtllm` C++ backend model for engines `cortex build-engine` built
"""

from __future__ import annotations

from pathlib import Path

TEMPLATES_DIR = Path(__file__).parent
