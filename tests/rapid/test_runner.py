import torch

from rapid.runner import pad_single_rows


def test_a_lone_row_gets_the_bits_it_gets_among_other_rows():
    """torch's one-row bf16 GEMM sums in another order than its many-row GEMM (in some of these rows the last bit
    differs without the padding); padded to two rows a decode step's projections equal its row in a tree."""
    torch.manual_seed(0)
    body = torch.nn.Sequential(torch.nn.Linear(1536, 576, bias=False)).bfloat16()
    pad_single_rows(body)
    pad_single_rows(body)  # idempotent
    rows = torch.randn(40, 8, 1536).bfloat16()
    with torch.inference_mode():
        for batch in rows:
            assert torch.equal(body(batch[None, :1])[0, 0], body(batch[None])[0, 0])
        assert body(rows[0, :1]).shape == (1, 576) and body(rows[0, 0]).shape == (576,)


def test_runner_pads_the_single_rows_of_half_precision_models_only(tiny_bf16_runner, tiny_runner):
    for runner, padded in ((tiny_bf16_runner, True), (tiny_runner, False)):
        linears = [m for m in runner.model.model.modules() if isinstance(m, torch.nn.Linear)]
        assert linears and all(getattr(m, "_pads_single_rows", False) == padded for m in linears)
    assert not getattr(tiny_bf16_runner.model.lm_head, "_pads_single_rows", False)  # the runner applies the head


def test_prefill_top_keeps_the_cache_of_prefill_and_the_top_k_of_every_row(tiny_runner):
    ids = torch.randint(0, 250, (40,), generator=torch.Generator().manual_seed(1)).tolist()  # 3 chunks of 16
    plain, kept = tiny_runner.new_cache(48), tiny_runner.new_cache(48)
    tiny_runner.prefill(plain, ids)
    top = tiny_runner.prefill_top(kept, ids, k=3)
    assert kept.length == plain.length == 40
    assert all(torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)
               for a, b in zip(plain.layers, kept.layers, strict=True))
    with torch.inference_mode():
        full = tiny_runner.model(torch.tensor([ids])).logits[0].float()
    probs = full.softmax(-1)
    assert top.tokens.shape == top.probs.shape == (40, 3) and top.tokens.dtype == torch.int32
    expected = probs.topk(3, dim=-1)
    assert torch.equal(top.tokens.long(), expected.indices)
    torch.testing.assert_close(top.probs, expected.values, rtol=1e-4, atol=1e-6)
