"""The OpenAI-compatible API layer: owns request schemas, their translation to engine parameters, and response bodies."""
