"""The gateway's HTTP API: one router per concern (openai, compat, jobs, health, admin, console), what they share (deps), OpenAI request schemas (schema) and response bodies (responses)."""
