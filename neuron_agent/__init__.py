"""The neuron agent: one per node. Supervises Triton, discovers GPUs, writes model repositories
and serves the lifecycle API. `neuron_agent.torch_engine` and `neuron_agent.engines.llamacpp` are
the engines Triton's Python backend runs, beside the glue they share (`engines.triton_glue`); the
torch engine imports only torch and safetensors (see DESIGN: no transformers in the stub), the
llama.cpp engine only llama-cpp-python and numpy.
(Names as in `control_plane`: the node is the host and what it holds, the neuron the agent.)
"""
