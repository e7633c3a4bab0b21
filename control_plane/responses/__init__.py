"""The OpenAI Responses dialect (POST /v1/responses), for Codex CLI and `client.responses`."""
