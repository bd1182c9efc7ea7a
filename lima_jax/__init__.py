"""LIMA-style supervised fine-tuning of LLaMA models in JAX."""
