"""Serving: one base model, a pool of adapters, mixed-adapter batches, an OpenAI-style API."""
