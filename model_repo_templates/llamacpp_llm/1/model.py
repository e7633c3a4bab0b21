# The Triton Python backend loads this file; the engine itself lives in the installed cortex
# package (the stub finds it through the virtual environment first on PATH).
from neuron_agent.engines.llamacpp.triton_model import TritonPythonModel  # noqa: F401
