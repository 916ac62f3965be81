"""Helpers behind run_mlm.py: arguments, data, tokenizer, model, metrics and outputs."""
