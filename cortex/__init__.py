"""cortex: one LLM endpoint over a fleet of Triton nodes.

This package holds what the gateway (`control_plane`), the node agent (`neuron_agent`) and the
engine builder (`build_engines`) share: the configuration schema, the neuron API's wire models,
the tiny demo model and the command line.
"""

__version__ = "0.1.0"
