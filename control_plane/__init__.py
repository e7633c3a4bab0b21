"""The gateway: the only thing clients see.

openai/, anthropic/   one folder per API dialect: wire models, translation, SSE encoders
canonical.py          the one internal chat request and event stream both dialects share
prompting.py          chat templates, tokenization, incremental detokenization, stop strings
tool_calls.py         parsing tool calls out of generated text (Hermes/Qwen, Llama-3 JSON)
generation.py         one request's way: model → node → Triton stream → canonical events
output.py             a generation's output, pure: token ids → text, stop strings, calls, reason
request_record.py     one request's record: its metrics and its log line
pacing.py             reading a stream that may fall silent: keep-alive ticks, the deadline
fleet.py, routing.py  fleet state from the neurons, routing and cold loads
node_client.py        the neuron lifecycle API and Triton's gRPC stream
metrics.py            Prometheus metrics (cortex_ prefix)
errors.py             the exception tree and its rendering per dialect
shutdown.py           SIGTERM/SIGINT: stop taking requests, drain answers in flight, cut the rest
app.py                the Sanic server: startup → serve → graceful shutdown
"""
