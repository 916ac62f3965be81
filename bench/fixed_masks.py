"""Seeded 15% masks (80% mask token, 10% random, 10% kept) for scoring held-out blocks.

The benchmarks score every model on the same blocks with the same masks, drawn here
independently of the project's own masking code (which is what they measure).
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
