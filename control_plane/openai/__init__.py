"""The OpenAI dialect: Chat Completions, legacy Completions, Models."""
