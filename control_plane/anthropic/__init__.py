"""The Anthropic dialect: Messages (streaming and not), token counting, Claude Code probes."""
