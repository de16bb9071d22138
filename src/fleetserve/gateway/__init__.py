"""The gateway: owns the OpenAI-compatible HTTP front end that tokenizes requests and dispatches them to workers."""
