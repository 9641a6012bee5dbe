"""Llama 3 example: model, named configs, tokenizer and data pipeline."""
