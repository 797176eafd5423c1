import pytest
import torch
import torch.nn.functional as F

from kvcache.gqa import FOLD_MAX_QUERIES, fold_mask, fold_queries, grouped_sdpa


def test_fold_puts_each_groups_heads_in_its_rows():
    query = torch.arange(6 * 2).float().view(1, 6, 2, 1)  # heads 0..5, 2 queries each
    folded = fold_queries(query, num_kv_heads=2)
    assert folded.shape == (1, 2, 6, 1)
    assert folded[0, 1, :, 0].tolist() == query[0, 3:6, :, 0].flatten().tolist()  # kv head 1: heads 3, 4, 5
    mask = torch.tensor([[True, False], [True, True]])
    assert fold_mask(mask, 3).tolist() == mask.tolist() * 3
    assert fold_mask(None, 3) is None


@pytest.mark.parametrize("num_queries", [5, FOLD_MAX_QUERIES + 1])  # folded, and a prefill-sized block
@pytest.mark.parametrize("mask_heads", [0, 1, 2])  # no mask, one mask for all heads, one per kv head
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_sdpa_equals_enable_gqa(num_queries, mask_heads, dtype):
    torch.manual_seed(0)
    query = torch.randn(1, 6, num_queries, 16, dtype=dtype)
    key, value = torch.randn(2, 1, 2, 40, 16, dtype=dtype)
    mask = None if mask_heads == 0 else torch.rand(1, mask_heads, num_queries, 40) > 0.3
    if mask is not None:
        mask[..., 0] = True  # every query sees something
    expected_mask = None if mask is None else mask.repeat_interleave(6 // mask_heads, dim=1)
    expected = F.scaled_dot_product_attention(query, key, value, attn_mask=expected_mask, scale=0.25,
                                              enable_gqa=True)
    out = grouped_sdpa(query, key, value, mask, 0.25)
    tolerance = 1e-6 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(out, expected, atol=tolerance, rtol=tolerance)


def test_heads_must_split_into_groups():
    with pytest.raises(ValueError, match="do not split"):
        fold_queries(torch.zeros(1, 5, 1, 4), num_kv_heads=2)
