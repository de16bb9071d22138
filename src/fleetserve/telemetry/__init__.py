"""Observability: request traces."""
