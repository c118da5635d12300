"""Shared test helpers (reference models built with transformers)."""
