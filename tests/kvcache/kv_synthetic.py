"""Synthetic document keys and trees for the kvcache tests (SmolLM2-135M shapes: 9 heads, 3 kv heads, D 64)."""

import torch
import torch.nn.functional as F

NUM_HEADS, NUM_KV_HEADS, HEAD_DIM = 9, 3, 64
SCALING = HEAD_DIM**-0.5


def planted_keys(num_tokens: int, num_directions: int, seed: int, norm: float = 3.0, noise: float = 0.3):
    """Keys around a few random directions: [Hkv, T, D] keys, [Hkv, K, D] unit directions, [Hkv, T] labels."""
    generator = torch.Generator().manual_seed(seed)
    directions = F.normalize(torch.randn(NUM_KV_HEADS, num_directions, HEAD_DIM, generator=generator), dim=-1)
    labels = torch.randint(0, num_directions, (NUM_KV_HEADS, num_tokens), generator=generator)
    keys = norm * directions.gather(1, labels[..., None].expand(-1, -1, HEAD_DIM))
    keys = keys + noise * torch.randn(NUM_KV_HEADS, num_tokens, HEAD_DIM, generator=generator)
    return keys, directions, labels


def ancestor_mask(parents: list[int]) -> torch.Tensor:
    """[N, N] bool, row i True at i and at each ancestor of i (parents[i] < i, -1 for a root)."""
    mask = torch.eye(len(parents), dtype=torch.bool)
    for node, parent in enumerate(parents):
        if parent >= 0:
            mask[node] |= mask[parent]
    return mask


def random_tree_mask(num_nodes: int, prefix: int, seed: int) -> torch.Tensor:
    """[N, prefix + N] tail mask: the whole prefix plus each node's ancestors and itself."""
    generator = torch.Generator().manual_seed(seed)
    parents = [-1] + [int(torch.randint(0, node, (1,), generator=generator)) for node in range(1, num_nodes)]
    return torch.cat([torch.ones(num_nodes, prefix, dtype=torch.bool), ancestor_mask(parents)], dim=1)
