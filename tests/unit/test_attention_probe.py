"""The A²CR attention probe: attention mass per key, against an explicit per-query softmax."""

from __future__ import annotations

import torch

from wicore.worker.paged_attention import key_mass


def test_key_mass_is_the_softmax_summed_over_heads_and_real_queries() -> None:
    torch.manual_seed(0)
    s, heads, kv_heads, qmax, keys_len, dim = 2, 4, 2, 3, 5, 8
    query = torch.randn(s, heads, qmax, dim)
    keys = torch.randn(s, kv_heads, keys_len, dim)
    # sequence 0: 3 queries at positions 2, 3, 4; sequence 1: one query at position 1, two padding rows
    query_positions = torch.tensor([[2, 3, 4], [1, -1, -1]])
    key_pos = torch.arange(keys_len)
    allowed = key_pos[None, None, :] <= query_positions[:, :, None]
    allowed[:, :, 0] |= query_positions < 0
    mask = allowed[:, None]

    got = key_mass(query, keys, mask, query_positions, scaling=0.5)

    want = torch.zeros(s, keys_len)
    for i in range(s):
        for h in range(heads):
            for q in range(qmax):
                pos = int(query_positions[i, q])
                if pos < 0:
                    continue
                k = keys[i, h // (heads // kv_heads), : pos + 1]
                want[i, : pos + 1] += torch.softmax(k @ query[i, h, q] * 0.5, dim=0)
    assert torch.allclose(got, want, atol=1e-5)
    assert torch.allclose(got.sum(1), torch.tensor([3.0 * heads, 1.0 * heads]))  # padding rows add nothing
