import pytest
import torch

from rapid.drafters.recycle import NextTokenTable, RecycleDrafter
from rapid.drafters.retrieval import RetrievalDraftConfig, RetrievalDrafter
from rapid.runner import TopTokens
from rapid.tree import SOURCE_DRAFT, SOURCE_RETRIEVAL, fuse
from retrieval.datastore import TokenDatastore


def paths(tree) -> set[tuple[int, ...]]:
    """Every root-to-node token path below the root."""
    found = set()
    for node in range(1, len(tree.tokens)):
        path, at = [], node
        while at:
            path.append(int(tree.tokens[at]))
            at = int(tree.parents[at])
        found.add(tuple(reversed(path)))
    return found


def test_retrieval_drafter_copies_from_the_question():
    """An answer that restates the question drafts the question's next tokens, though the document lacks them."""
    document = list(range(100, 160))
    question = [7, 8, 9, 10, 11, 12]
    drafter = RetrievalDrafter(TokenDatastore.build([document]), question)
    tree = drafter.propose([3, 8, 9], budget=8)
    assert (10, 11, 12) in paths(tree)
    assert all(int(source) == SOURCE_RETRIEVAL for source in tree.sources[1:])


def test_retrieval_drafter_copies_from_the_document_and_its_own_answer():
    document = list(range(100, 160))
    drafter = RetrievalDrafter(TokenDatastore.build([document]), [1, 2])
    assert (121, 122) in {path[:2] for path in paths(drafter.propose([119, 120], budget=8))}
    drafter.propose([50, 51, 52, 53], budget=8)
    assert (52, 53) in {path[:2] for path in paths(drafter.propose([50, 51], budget=8))}


def test_retrieval_weight_grows_with_the_match_length():
    """Fused with a recycled guess of probability 0.45, a copy after a 1-token match loses the one free node and a
    copy after a 4-token match (weight 0.2 + 3 x 0.1 = 0.5) wins it."""
    config = RetrievalDraftConfig(score_weight=0.2, weight_per_match_token=0.1, max_weight=0.95)
    assert [config.weight(n) for n in (0, 1, 3, 9, 20)] == pytest.approx([0.2, 0.2, 0.4, 0.95, 0.95])
    document = [50, 1, 2, 3, 4, 5, 60]
    recycled = RecycleDrafter([], table_of({(-1, 4): [(9, 0.45)], (3, 4): [(9, 0.45)], (7, 4): [(9, 0.45)]}))
    short = RetrievalDrafter(TokenDatastore.build([document]), [], config).propose([7, 4], budget=4)
    assert short.tokens[1] == 5 and short.scores[1] == pytest.approx(0.2)
    assert fuse([short, recycled.propose([7, 4], budget=4)], 1).tokens == [4, 9]
    recycled.recent = [-1]
    long = RetrievalDrafter(TokenDatastore.build([document]), [], config).propose([1, 2, 3, 4], budget=4)
    assert long.scores[1] == pytest.approx(0.5)
    assert fuse([long, recycled.propose([1, 2, 3, 4], budget=4)], 1).tokens == [4, 5]
    for bad in (dict(score_weight=0.0), dict(score_weight=0.5, max_weight=0.4), dict(weight_per_match_token=-0.1)):
        with pytest.raises(ValueError):
            RetrievalDraftConfig(**bad)


def table_of(rows: dict[tuple[int, int], list[tuple[int, float]]]) -> NextTokenTable:
    table = NextTokenTable()
    for (prev, token), row in rows.items():
        table.update([prev], [token], [[t for t, _ in row]], [[p for _, p in row]])
    return table


def test_next_token_table_prefers_the_pair_then_the_single_then_its_base():
    top = TopTokens(torch.tensor([[1, 2], [3, 4], [7, 8]], dtype=torch.int32),
                    torch.tensor([[0.5, 0.2], [0.6, 0.1], [0.9, 0.05]]))
    document = NextTokenTable.from_prefill([5, 6, 5], top)  # keys (-1, 5), (5, 6), (6, 5)
    assert document.get(-1, 5)[0] == (1, 2) and document.get(6, 5)[0] == (7, 8)
    assert document.get(9, 5)[0] == (7, 1)  # no pair (9, 5): the mean row after 5, 7 (.45) and 1 (.25)
    assert document.get(9, 4) is None
    request = NextTokenTable(base=document)
    request.update([9], [5], [[11]], [[0.3]])
    assert request.get(6, 5)[0] == (7, 8)  # the document's pair beats the request's single
    assert request.get(2, 5)[0] == (11,) and document.get(2, 5)[0] == (7, 1)  # the document is never written
    with pytest.raises(ValueError, match="rows of next tokens"):
        NextTokenTable.from_prefill([5, 6], top)


def test_prefill_table_keeps_the_mean_of_every_occurrence():
    """The pair (3, 4) occurs three times: 9 is the target's first guess once at 0.9 and second twice at 0.3, so its
    mean 0.5 beats 8 (0.6 + 0.6 + 0 over 3 = 0.4) though the last occurrence ranked 8 first; a request's rows
    replace."""
    ids = [3, 4, 3, 4, 3, 4]
    top = TopTokens(torch.tensor([[4, 0], [9, 7], [4, 0], [8, 9], [4, 0], [8, 9]], dtype=torch.int32),
                    torch.tensor([[1.0, 0.0], [0.9, 0.05], [1.0, 0.0], [0.6, 0.3], [1.0, 0.0], [0.6, 0.3]]))
    table = NextTokenTable.from_prefill(ids, top)
    tokens, probs = table.get(3, 4)
    assert tokens == (9, 8) and probs == pytest.approx([0.5, 0.4])
    assert table.get(-1, 3)[0] == (4, 0) and table.get(4, 3)[0] == (4, 0)
    assert table.singles[4] == table.pairs[(3, 4)]
    table.update([3], [4], [[7]], [[0.8]])
    assert table.get(3, 4) == ((7,), (0.8,))
    empty = NextTokenTable.from_prefill([], TopTokens(torch.zeros(0, 2, dtype=torch.int32), torch.zeros(0, 2)))
    assert empty.get(3, 4) is None


def test_recycle_drafter_grows_the_most_probable_paths_first():
    table = table_of({(1, 2): [(3, 0.6), (4, 0.3)], (2, 3): [(5, 0.5)], (2, 4): [(6, 0.9)], (3, 5): [(7, 0.9)]})
    drafter = RecycleDrafter([1], table)
    tree = drafter.propose([2], budget=3)
    # candidates by path probability: 3 (.6), then 5 (.3) and 4 (.3, pushed first), then 7 (.27) and 6 (.27)
    assert paths(tree) == {(3,), (4,), (3, 5)}
    assert tree.scores[1:] == pytest.approx([0.6, 0.3, 0.3])
    assert all(source == SOURCE_DRAFT for source in tree.sources[1:])
    assert len(drafter.propose([9], budget=3)) == 1  # nothing known after 9: an empty tree


def test_recycle_drafter_learns_the_accepted_path_last():
    """Two nodes of a tree end in token 3: the row after the one on the accepted path is the one kept for 3."""
    drafter = RecycleDrafter([1], k=1)
    tree = drafter.propose([2], budget=4)  # nothing known yet: build the tree by hand
    three, four = tree.add(0, 3, 1.0, SOURCE_DRAFT), tree.add(0, 4, 1.0, SOURCE_DRAFT)
    tree.add(four, 3, 1.0, SOURCE_DRAFT), tree.add(three, 5, 1.0, SOURCE_DRAFT)
    logits = torch.full((5, 10), -9.0)
    for node, best in enumerate([3, 5, 1, 6, 8]):
        logits[node, best] = 0.0
    drafter.observe(tree, logits, path=[0, 1, 4])  # root 2 -> 3 -> 5 accepted; 4 and the 3 after it rejected
    assert drafter.table.get(1, 2)[0] == (3,) and drafter.table.get(3, 5)[0] == (8,)
    assert drafter.table.get(2, 4)[0] == (1,) and drafter.table.get(4, 3)[0] == (6,)  # rejected rows are kept too
    assert drafter.table.get(2, 3)[0] == (5,)
    assert drafter.table.get(7, 3)[0] == (5,)  # no pair (7, 3): the accepted 3's row, though node 3 came later
    assert drafter.table.get(1, 2)[1][0] == pytest.approx(1 / (1 + 9 * torch.exp(torch.tensor(-9.0)).item()))
