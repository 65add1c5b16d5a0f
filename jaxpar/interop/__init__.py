"""Interoperability with other ecosystems' files: Hugging Face config.json and safetensors checkpoints."""
