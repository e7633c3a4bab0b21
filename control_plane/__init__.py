"""The gateway: the only thing clients see.

openai/, anthropic/,  one folder per API dialect: wire models, translation, SSE encoders
responses/
wire.py               what every dialect shares on HTTP: reading the body, the SSE send loop
canonical.py          the one internal chat request and event stream both dialects share
prompting.py          chat templates, tokenization, incremental detokenization, stop strings
tool_calls.py         parsing tool calls out of generated text (Hermes/Qwen, Llama-3 JSON)
generation.py         one request's way: model → node → Triton stream → canonical events
output.py             a generation's output, pure: token ids → text, stop strings, calls, reason
request_record.py     one request's record: its metrics and its log line
pacing.py             reading a stream that may fall silent: keep-alive ticks, the deadline
fleet.py, routing.py  fleet state from the nodes' neurons, routing and cold loads
lifecycle.py          placement, eviction, replicas and defragmentation plans, pure
node_client.py        the neuron lifecycle API and Triton's gRPC stream
metrics.py            Prometheus metrics (cortex_ prefix)
errors.py             the exception tree and its rendering per dialect
shutdown.py           SIGTERM/SIGINT: stop taking requests, drain answers in flight, cut the rest
app.py                the Sanic server: startup → serve → graceful shutdown

Names. A *node* is one member of the fleet: a host, its GPUs, its Triton and the models on them;
code about the fleet says node (`Fleet.nodes`, `NodeView`, `NodeClient`, "node X is down" to
clients). The *neuron* (neuron agent) is the program on a node that manages them, and the
lifecycle API it serves: `cortex neuron`, `[[neurons]]` (the agents' endpoints), `NeuronStatus`,
`NeuronClient` (the HTTP client of that API), `cortex_neuron_up`. A model's engine is an
`EngineKind` (torch or trtllm); `Engine` is only the torch engine's step loop.
"""
