"""From text to masked batches: raw text, the tokenizer, tokenized blocks, streaming, prepared data, masks."""
