import shutil

import pytest
import torch

from kvcache import native
from kvcache.gqa import grouped_sdpa
from rapid.attention import NATIVE_MAX_QUERIES, attend_cache, sdpa_only

pytestmark = pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler for the native kernel")


def case(dtype, queries, length=700):
    generator = torch.Generator().manual_seed(queries)
    query = torch.randn(1, 9, queries, 64, generator=generator).to(dtype)
    stored = torch.randn(2, 1, 3, length + 100, 64, generator=generator).to(dtype)
    mask = torch.ones(1, 1, queries, length, dtype=torch.bool)
    mask[0, 0, :, length - queries :] = torch.tril(torch.ones(queries, queries, dtype=torch.bool))
    return query, stored[0, :, :, :length], stored[1, :, :, :length], mask  # cache views, as the KV cache hands them


@pytest.mark.parametrize("queries", [1, 16, NATIVE_MAX_QUERIES + 1])
def test_bf16_decode_steps_and_trees_go_to_our_kernel_and_match_sdpa(queries, monkeypatch):
    calls = []
    kernel = native.cache_attention
    monkeypatch.setattr(native, "cache_attention", lambda *args, **kwargs: calls.append(1) or kernel(*args, **kwargs))
    query, keys, values, mask = case(torch.bfloat16, queries)
    out = attend_cache(query, keys, values, mask, 0.125)
    assert len(calls) == (queries <= NATIVE_MAX_QUERIES)
    expected = grouped_sdpa(query, keys, values, mask, 0.125)
    torch.testing.assert_close(out, expected, atol=2e-2, rtol=2e-2)
    with sdpa_only():
        assert torch.equal(attend_cache(query, keys, values, mask, 0.125), expected)
    assert len(calls) == (queries <= NATIVE_MAX_QUERIES)


def test_fp32_caches_stay_on_sdpa():
    query, keys, values, mask = case(torch.float32, 4)
    assert torch.equal(attend_cache(query, keys, values, mask, 0.125), grouped_sdpa(query, keys, values, mask, 0.125))
