"""Text to token ids outside the training loop: tokenizers (bytes or a Hugging Face tokenizer.json) and
prepared corpora (token shards plus a manifest, written by scripts/prepare_data.py).

Knows nothing of jaxpar and imports no jax, so the worker processes that tokenize a corpus start quickly.
"""
