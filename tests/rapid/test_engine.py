"""Temperature 0: the engine's output is the target's own greedy output, for every drafter and shape."""

import pytest
import torch

from rapid.drafters.model import DraftConfig, ModelDrafter, SharedRows, layer_skip_view
from rapid.drafters.recycle import NextTokenTable, RecycleDrafter
from rapid.drafters.retrieval import RetrievalDrafter
from rapid.engine import EngineConfig, SpeculativeEngine
from rapid.generate import GenerationConfig, generate_all
from rapid.metrics import SpecStats
from rapid.runner import ModelRunner
from rapid.sampling import SamplingConfig
from rapid.verify import VerifyConfig
from retrieval.datastore import TokenDatastore

CHAIN = DraftConfig(max_depth=4, branch=1, width=1, min_path_prob=0.0)
TREE = DraftConfig(max_depth=3, branch=2, width=2, min_path_prob=0.0)


def run_engine(runner, prompt, drafters, config):
    engine = SpeculativeEngine(runner, config)
    cache = runner.new_cache(config.capacity(len(prompt)))
    stats = SpecStats()
    out = [token for chunk in engine.generate(cache, prompt, drafters, stats) for token in chunk]
    return out, stats


@pytest.fixture(scope="module")
def workload(tiny_runner):
    gen = torch.Generator().manual_seed(0)
    document = torch.randint(0, 255, (200,), generator=gen).tolist()
    question = torch.randint(0, 255, (8,), generator=gen).tolist()
    reference = generate_all(tiny_runner, document + question, GenerationConfig(max_new_tokens=30))
    # a datastore that contains part of the answer, so retrieval drafts get accepted sometimes
    datastore = TokenDatastore.build([document + reference[:15]])
    return document, question, reference, datastore


def drafters_for(name, runner, tiny, document, question, datastore, shape):
    rag = document[-40:] + question
    if name == "self":
        return [ModelDrafter(runner, rag, 64, shape, SamplingConfig())]
    if name == "layer-skip":
        return [ModelDrafter(ModelRunner(layer_skip_view(tiny.model, 1)), rag, 64, shape, SamplingConfig())]
    if name in ("self-shared", "layer-skip-shared"):  # the last 40 document rows copied from the target
        shared = SharedRows.from_spans(0, [(len(document) - 40, len(document))], len(document))
        model_runner = runner if name == "self-shared" else ModelRunner(layer_skip_view(tiny.model, 1))
        return [ModelDrafter(model_runner, rag, 64, shape, SamplingConfig(), shared=shared)]
    if name == "retrieval":
        return [RetrievalDrafter(datastore, question)]
    if name == "fused":
        return [ModelDrafter(runner, rag, 64, shape, SamplingConfig()), RetrievalDrafter(datastore, question)]
    if name == "recycle":  # seeded with the target's top-k over the document, as an ingest keeps it
        return [RecycleDrafter(question, document_table(runner, document))]
    if name == "recycle+retrieval":
        return [RetrievalDrafter(datastore, question), RecycleDrafter(question, document_table(runner, document))]
    raise ValueError(name)


def document_table(runner, document):
    return NextTokenTable.from_prefill(document, runner.prefill_top(runner.new_cache(len(document)), document, k=4))


@pytest.mark.parametrize("shape", [CHAIN, TREE], ids=["chain", "tree"])
@pytest.mark.parametrize("name", ["self", "layer-skip", "self-shared", "layer-skip-shared", "retrieval", "fused",
                                  "recycle", "recycle+retrieval"])
def test_greedy_output_equals_the_target(tiny, tiny_runner, workload, name, shape):
    document, question, reference, datastore = workload
    drafters = drafters_for(name, tiny_runner, tiny, document, question, datastore, shape)
    out, stats = run_engine(tiny_runner, document + question, drafters, EngineConfig(max_new_tokens=30))
    assert out == reference
    assert stats.num_emitted_tokens == 30 and stats.num_drafts > 0


def test_a_self_drafter_sharing_every_row_is_the_target_and_never_rejected(tiny_runner, workload):
    document, question, reference, _ = workload
    shared = SharedRows.from_spans(0, [(0, len(document))], len(document))
    drafter = ModelDrafter(tiny_runner, [0], 64, CHAIN, SamplingConfig(), shared=shared)
    out, stats = run_engine(tiny_runner, document + question, [drafter], EngineConfig(max_new_tokens=30))
    assert out == reference
    assert drafter.copied_rows == len(document) + len(question)  # nothing was prefilled
    assert stats.num_accepted_tokens == stats.num_draft_tokens  # it drafts exactly what the target says


def test_shared_rows_docstring_example():
    rows = SharedRows.from_spans(3, [(0, 2), (1, 4)], 20)
    assert rows.document_rows.tolist() == [0, 1, 2, 3, 4, 5, 6] and rows.prefix_len == 20


def test_retrieval_drafts_are_accepted_when_the_answer_is_in_the_document(tiny_runner, workload):
    document, question, reference, _ = workload
    datastore = TokenDatastore.build([document + question + reference])
    out, stats = run_engine(tiny_runner, document + question, [RetrievalDrafter(datastore, question)],
                            EngineConfig(max_new_tokens=30))
    assert out == reference
    assert stats.mean_acceptance_length > 2


def test_the_recycling_drafter_learns_every_committed_token_and_its_repeats_get_accepted(tiny_runner, workload):
    document, question, reference, _ = workload
    drafter = RecycleDrafter(question)  # no document table: only what this request's forwards show it
    out, stats = run_engine(tiny_runner, document + question, [drafter], EngineConfig(max_new_tokens=30))
    assert out == reference
    committed = [question[-1], *out[:-1]]  # each was a step's root or an accepted node; the last is a bonus
    assert all((prev, token) in drafter.table.pairs for prev, token in zip(committed, committed[1:], strict=False))
    assert stats.num_accepted_tokens > 0  # the answer repeats 33: the target's row after 33 drafts it


def test_stop_tokens_and_max_new_tokens(tiny_runner, workload):
    document, question, reference, datastore = workload
    stop = reference[10]
    first = reference.index(stop)
    config = EngineConfig(max_new_tokens=30, stop_token_ids=(stop,))
    out, _ = run_engine(tiny_runner, document + question, [RetrievalDrafter(datastore, question)], config)
    assert out == reference[:first + 1]
    out, _ = run_engine(tiny_runner, document + question, [RetrievalDrafter(datastore, question)],
                        EngineConfig(max_new_tokens=7))
    assert out == reference[:7]


def test_same_seed_same_sampled_output(tiny_runner, workload):
    document, question, _, datastore = workload
    sampled = SamplingConfig(temperature=0.8, seed=5)
    config = EngineConfig(max_new_tokens=20, verify=VerifyConfig(sampling=sampled))

    def once():
        drafters = [ModelDrafter(tiny_runner, document[-40:] + question, 64, CHAIN, sampled,
                                 torch.Generator().manual_seed(3)), RetrievalDrafter(datastore, question)]
        return run_engine(tiny_runner, document + question, drafters, config)[0]

    assert once() == once()


def test_cache_too_small_is_refused(tiny_runner):
    engine = SpeculativeEngine(tiny_runner, EngineConfig(max_new_tokens=10))
    with pytest.raises(ValueError, match="cache holds"):
        next(engine.generate(tiny_runner.new_cache(12), list(range(10)), []))


@pytest.mark.slow
def test_greedy_equality_on_the_default_model(default_lm):
    tok = default_lm.tokenizer
    document = ("The lighthouse keeper's log for the winter of 1893 records storms on eleven nights. "
                "On the third of February the lamp failed for an hour and the keeper, Amos Pell, "
                "relit it by hand. ") * 12
    messages = [{"role": "user", "content": f"{document}\n\nWho relit the lamp, and when?"}]
    prompt = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
    runner = ModelRunner(default_lm.model, prefill_chunk=256)
    reference = generate_all(runner, prompt, GenerationConfig(max_new_tokens=24))
    doc_ids = tok(document, add_special_tokens=False).input_ids
    datastore = TokenDatastore.build([doc_ids])
    question_ids = prompt[-20:]
    for drafters in (
        [RetrievalDrafter(datastore, question_ids)],
        [ModelDrafter(runner, prompt[-120:], 64, TREE, SamplingConfig()), RetrievalDrafter(datastore, question_ids)],
        [ModelDrafter(ModelRunner(layer_skip_view(default_lm.model, 8)), prompt[-120:], 64, CHAIN, SamplingConfig())],
    ):
        out, stats = run_engine(runner, prompt, drafters, EngineConfig(max_new_tokens=24))
        assert out == reference
