"""Seeded 15% masks (80% mask token, 10% random, 10% kept) for scoring held-out blocks.

The benchmarks score every model on the same blocks with the same masks, drawn here
independently of the project's own masking code (which is what they measure), with the
same loop (`masked_scores`).
"""

from __future__ import annotations


def seeded_masks(blocks, tokenizer, seed: int, rate: float = 0.15):
    """(inputs, labels) for `blocks` (a 2-D tensor of ids): special tokens are never selected."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    special = torch.isin(blocks, torch.tensor(tokenizer.all_special_ids))
    selected = (torch.rand(blocks.shape, generator=generator) < rate) & ~special
    action = torch.rand(blocks.shape, generator=generator)
    random_ids = torch.randint(len(tokenizer), blocks.shape, generator=generator)
    inputs = torch.where(selected & (action < 0.8), tokenizer.mask_token_id, blocks)
    inputs = torch.where(selected & (action >= 0.8) & (action < 0.9), random_ids, inputs)
    return inputs, torch.where(selected, blocks, -100)


def text_blocks(tokenizer, path, block_size: int):
    """The non-empty lines of `path` tokenized one by one, concatenated and cut into blocks (a 2-D long tensor)."""
    import numpy as np
    import torch

    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line]
    ids = np.concatenate([np.asarray(x, dtype=np.int64) for x in tokenizer(lines, verbose=False)["input_ids"]])
    return torch.as_tensor(ids[: len(ids) // block_size * block_size].reshape(-1, block_size))


def masked_scores(model, inputs, labels, batch_size: int = 64) -> dict:
    """The model's summed loss, correct predictions and count over the labelled (masked) tokens, in fp32."""
    import torch

    total = correct = count = 0.0
    with torch.no_grad():
        for start in range(0, len(inputs), batch_size):
            logits = model(input_ids=inputs[start:start + batch_size]).logits.float()
            target = labels[start:start + batch_size]
            kept = target != -100
            total += torch.nn.functional.cross_entropy(logits[kept], target[kept], reduction="sum").item()
            correct += (logits[kept].argmax(-1) == target[kept]).sum().item()
            count += kept.sum().item()
    return {"loss": total / count, "accuracy": correct / count, "tokens": int(count)}
