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
