"""The neuron agent: one per node. Supervises Triton, discovers GPUs, writes model repositories
and serves the lifecycle API. `neuron_agent.torch_engine` is the engine that Triton's Python
backend runs; it imports only torch and safetensors (see DESIGN: no transformers in the stub).
(Names as in `control_plane`: the node is the host and what it holds, the neuron the agent.)
"""
