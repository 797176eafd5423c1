from rapid.drafters.retrieval import RetrievalDrafter
from rapid.tree import SOURCE_RETRIEVAL
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
