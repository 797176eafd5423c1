import pytest
import torch

from rapid.cache import KV_BLOCK, CacheFullError, KVCache


def _decode_path(runner, prompt, path):
    cache = runner.new_cache(64)
    runner.prefill(cache, prompt)
    for token in path:
        runner.decode(cache, token)
    return cache


def test_chunked_prefill_matches_one_pass(tiny, tiny_runner):
    ids = torch.randint(0, 250, (1, 50))
    reference = tiny.model(ids).logits[0, -1]
    cache = tiny_runner.new_cache(64)
    logits = tiny_runner.prefill(cache, ids[0])
    assert cache.length == 50
    torch.testing.assert_close(logits, reference, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("path, path_tokens", [([0, 2, 3], [5, 7, 8]), ([0, 1], [5, 6]), ([0], [5])])
def test_commit_equals_decoding_the_accepted_path(tiny_runner, path, path_tokens):
    """Rows move where the path skips a node; a path of the first nodes (0, 1, ...) stays where it is."""
    prompt = list(range(10, 30))
    # tree: 0 -> (1, 2), 2 -> 3, 3 -> 4
    tokens = torch.tensor([5, 6, 7, 8, 9])
    parents = [-1, 0, 0, 2, 3]
    depths = torch.tensor([0, 1, 1, 2, 3])
    mask = torch.zeros(5, 5, dtype=torch.bool)
    for node, parent in enumerate(parents):
        mask[node, node] = True
        while parent >= 0:
            mask[node, parent] = True
            parent = parents[parent]
    cache = tiny_runner.new_cache(64)
    tiny_runner.prefill(cache, prompt)
    tiny_runner.score_tree(cache, tokens, depths, mask)
    cache.commit(len(prompt), torch.tensor(path))
    expected = _decode_path(tiny_runner, prompt, path_tokens)
    assert cache.length == expected.length == len(prompt) + len(path)
    for ours, theirs in zip(cache.layers, expected.layers, strict=True):
        torch.testing.assert_close(ours.keys[:, :, :cache.length], theirs.keys[:, :, :cache.length])
        torch.testing.assert_close(ours.values[:, :, :cache.length], theirs.values[:, :, :cache.length])
    # and the next step after the committed path agrees too
    torch.testing.assert_close(tiny_runner.decode(cache, 9), tiny_runner.decode(expected, 9), atol=1e-5, rtol=1e-5)


def test_tree_logits_equal_sequential_logits(tiny_runner):
    prompt = list(range(40, 60))
    tokens = torch.tensor([11, 12, 13])
    depths = torch.tensor([0, 0, 1])  # two root children, the third under the second
    mask = torch.tensor([[1, 0, 0], [0, 1, 0], [0, 1, 1]], dtype=torch.bool)
    cache = tiny_runner.new_cache(64)
    tiny_runner.prefill(cache, prompt)
    tree_logits = tiny_runner.score_tree(cache, tokens, depths, mask)
    for node, path in ((0, [11]), (1, [12]), (2, [12, 13])):
        seq = tiny_runner.new_cache(64)
        logits = tiny_runner.prefill(seq, prompt + path)
        torch.testing.assert_close(tree_logits[node], logits, atol=1e-5, rtol=1e-5)


def test_truncate_and_capacity(tiny_runner):
    cache = tiny_runner.new_cache(8)
    tiny_runner.prefill(cache, list(range(6)))
    cache.truncate(4)
    assert cache.length == 4
    with pytest.raises(ValueError):
        cache.truncate(5)
    with pytest.raises(CacheFullError):
        tiny_runner.prefill(cache, list(range(5)))


def test_cache_reports_lengths():
    cache = KVCache(num_layers=2, capacity=16)
    assert cache.length == 0 and cache.get_seq_length() == 0 and cache.get_max_length() == 16


@pytest.mark.parametrize("prompt_length", [300, KV_BLOCK - 3, 1000])
@pytest.mark.parametrize("seed", range(12))
def test_bf16_tree_rows_equal_decode_steps_bit_for_bit(tiny_bf16_runner, path_tree, greedy_steps, prompt_length,
                                                       seed):
    """A branching tree's nodes on the greedy path get exactly the logits of one-token steps, and so does the
    step after committing them: bf16 speculation stays identical to bf16 decoding. Two things make it so: the
    attention kernel (kvcache.native.cache_attention) gives each row a fixed function of the keys it sees, and
    the linear layers take a lone row as two (rapid.runner.pad_single_rows). Without either (torch's flash SDPA
    over the padded cache, or one-row GEMMs) 2 of these 36 cases differ; KV_BLOCK - 3 puts the tree across a
    block boundary."""
    runner = tiny_bf16_runner
    prompt = torch.randint(0, 250, (prompt_length,), generator=torch.Generator().manual_seed(seed)).tolist()
    cache = runner.new_cache(KV_BLOCK * 2)
    path, steps, token = greedy_steps(runner, cache, int(runner.prefill(cache, prompt).argmax()), 5)
    after = runner.decode(cache, token)
    cache.truncate(len(prompt))
    tokens, depths, mask, slots = path_tree(path)
    tree_logits = runner.score_tree(cache, tokens, depths, mask)
    for slot, step in zip(slots, steps, strict=True):
        assert torch.equal(tree_logits[slot], step)
    cache.commit(len(prompt), torch.tensor(slots))
    assert torch.equal(runner.decode(cache, token), after)
