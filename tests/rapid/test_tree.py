import torch

from rapid.tree import SOURCE_DRAFT, SOURCE_RETRIEVAL, TokenTree, fuse, prune, trim


def chain(root, tokens, source=SOURCE_DRAFT, probs=0.5):
    tree = TokenTree.root(root)
    node = 0
    for token in tokens:
        node = tree.add(node, token, tree.scores[node] * probs, source)
    return tree


def test_ancestor_mask_worked_example():
    tree = TokenTree([1, 2, 3, 4], [-1, 0, 0, 1], [1, 1, 1, 1], [0, 1, 1, 1])
    expected = torch.tensor([[1, 0, 0, 0], [1, 1, 0, 0], [1, 0, 1, 0], [1, 1, 0, 1]], dtype=torch.bool)
    assert torch.equal(tree.ancestor_mask(), expected)
    assert tree.depths() == [0, 1, 1, 2]


def test_fuse_worked_example_shares_the_prefix():
    fused = fuse([chain(9, [5, 6]), chain(9, [5, 7], SOURCE_RETRIEVAL)], budget=10)
    assert fused.tokens == [9, 5, 6, 7] and fused.parents == [-1, 0, 1, 1]


def test_fusing_a_tree_with_itself_is_identity():
    tree = TokenTree.root(1)
    a = tree.add(0, 2, 0.6, SOURCE_DRAFT)
    tree.add(0, 3, 0.3, SOURCE_DRAFT)
    tree.add(a, 4, 0.4, SOURCE_DRAFT)
    fused = fuse([tree, tree], budget=10)
    assert (fused.tokens, fused.parents, fused.scores) == (tree.tokens, tree.parents, tree.scores)


def test_sampled_nodes_are_never_merged():
    sampled = TokenTree.root(1)
    sampled.add(0, 2, 0.5, SOURCE_DRAFT, torch.tensor([0.5, 0.5, 0.0]))
    fused = fuse([sampled, chain(1, [2], SOURCE_RETRIEVAL)], budget=10)
    assert fused.tokens == [1, 2, 2]


def test_trim_keeps_the_best_nodes_and_their_ancestors():
    tree = chain(0, [1, 2, 3], probs=0.9)
    tree.add(0, 7, 0.8, SOURCE_RETRIEVAL)
    kept = trim(tree, 3)
    assert len(kept) == 4
    for i in range(1, len(kept)):
        assert kept.parents[i] < i
    assert kept.tokens == [0, 1, 2, 7]


def test_prune_drops_unlikely_retrieval_children():
    tree = chain(0, [7, 8], SOURCE_RETRIEVAL)
    probs = torch.full((10,), 0.1)
    probs[7] = 0.01
    assert prune(tree, {(): probs}, threshold=0.05).tokens == [0]
    probs[7] = 0.2
    assert prune(tree, {(): probs}, threshold=0.05).tokens == [0, 7, 8]
