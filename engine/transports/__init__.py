"""Transports: one module per backend, imported lazily."""
