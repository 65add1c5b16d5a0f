"""Inference on the training mesh: KV caches placed by the rules table (cache.py), samplers (sampling.py),
the continuous-batching engine (engine.py), loading a run's weights (model.py), text streaming (text.py)
and the OpenAI-compatible HTTP server (server.py)."""
