"""Cascade attention: a prefix shared by several sequences is read once for all of them.

The gather path (paged_attention.py) copies every sequence's whole context out of the
pool in every layer, so a prefix held by 16 sequences is copied 16 times per layer.
Here the sequences that share leading blocks (prefix-cache hits of one prompt) attend
them together, and each sequence then attends only its own blocks:

    seq a: [ p0 p1 p2 | a3 a4 ]     p0..p2: the same pool blocks
    seq b: [ p0 p1 p2 | b3 ]
    seq c: [ c0 c1 ]                shares nothing: its whole context is its own part

    shared part: the queries of a and b, every query head of one KV head stacked as
                 rows, against p0..p2 in one GEMM-shaped attention; the blocks are a
                 view of the pool when their ids are consecutive, one copy otherwise
    own part:    each sequence against its own blocks (gathered, as the gather path does,
                 padded to the longest of its part: a's and b's together, c alone)
    merge:       the two partial softmaxes combined by their log-sum-exp

In a decode step under `worker.attention_backend: paged` the native kernels do the same without
copying anything (`paged_decode_attention`, csrc/paged_attention.c): each sequence's own keys read
in place, and each prefix read once for its members, all their query heads of a KV head as the
rows of one GEMM-shaped attention (`PrefixTables` says who shares what).

The merge is exact up to rounding order. Every real query attends its own key, which
is never in a shared prefix, so the own part never has an empty row; the shared part
can (a sliding window may end before the prefix does) and then weighs nothing.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from wicore.worker.native import PagedDecode
    from wicore.worker.paged_attention import KVPool

# A prefix shorter than this (in blocks) is attended as part of each sequence's own part.
MIN_SHARED_BLOCKS = 2


def shared_prefixes(
    tables: Sequence[Sequence[int]],
    computed: Sequence[int],
    block_size: int,
    min_blocks: int = MIN_SHARED_BLOCKS,
) -> list[tuple[list[int], int]]:
    """Groups of two or more sequences whose block tables start with the same blocks, as
    (their batch indices, how many blocks they share). Only blocks computed before this step
    count (a block written this step belongs to one sequence); at least `min_blocks`."""
    by_first: dict[int, list[int]] = defaultdict(list)
    for i, table in enumerate(tables):
        if table and computed[i] >= min_blocks * block_size:
            by_first[table[0]].append(i)
    groups = []
    for members in by_first.values():
        if len(members) < 2:
            continue
        limit = min(computed[i] // block_size for i in members)
        first = tables[members[0]]
        n = 0
        while n < limit and all(tables[i][n] == first[n] for i in members):
            n += 1
        if n >= min_blocks:
            groups.append((members, n))
    return groups


@dataclass(frozen=True, slots=True)
class PrefixTables:
    """A decode step's shared prefixes as the native kernel takes them (flat int64 tables): group g's
    members are the batch rows members[member_offsets[g]:member_offsets[g + 1]], and they share the
    blocks blocks[block_offsets[g]:block_offsets[g + 1]] (positions 0 to their end)."""

    groups: int
    member_offsets: torch.Tensor  # [groups + 1]
    members: torch.Tensor
    block_offsets: torch.Tensor  # [groups + 1]
    blocks: torch.Tensor

    @classmethod
    def of(cls, groups: Sequence[tuple[Sequence[int], Sequence[int]]]) -> PrefixTables | None:
        """From (members, shared blocks) pairs; None where there are none."""
        if not groups:
            return None
        members = [i for rows, _ in groups for i in rows]
        blocks = [b for _, ids in groups for b in ids]
        member_offsets, block_offsets = [0], [0]
        for rows, ids in groups:
            member_offsets.append(member_offsets[-1] + len(rows))
            block_offsets.append(block_offsets[-1] + len(ids))

        def table(values: list[int]) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.int64)

        return cls(len(groups), table(member_offsets), table(members), table(block_offsets), table(blocks))

    def arguments(self) -> tuple[int, int, int, int, int]:
        """The C kernel's (groups, member_offsets, members, block_offsets, blocks)."""
        return (
            self.groups,
            self.member_offsets.data_ptr(),
            self.members.data_ptr(),
            self.block_offsets.data_ptr(),
            self.blocks.data_ptr(),
        )


@dataclass(frozen=True, slots=True)
class DecodeRows:
    """A decode step for the native kernel (`worker.attention_backend: paged`): sequence i attends
    its keys at positions [starts[i], ends[i]) through tables[i] (its own part: after its shared
    prefix, if any), and the members of each shared prefix attend it together (`prefixes`)."""

    kernel: PagedDecode
    tables: torch.Tensor  # [S, max_blocks] int64
    starts: torch.Tensor  # [S] int64
    ends: torch.Tensor  # [S] int64: kv_lens
    prefixes: PrefixTables | None = None


@dataclass(slots=True)
class Part:
    """Sequences attended together: the members of one shared prefix, or every sequence that
    shares nothing. Each attends its own blocks (after the prefix, if any) gathered to the
    longest among them, then the prefix once for all of them."""

    seqs: torch.Tensor | None  # [Sp] batch indices; None: the whole batch, in order
    own_tables: torch.Tensor  # [Sp * max own blocks] each sequence's blocks after the prefix, flat
    own_start: int  # the absolute position of every member's first own key (the prefix's length)
    max_own: int  # Ls: own keys gathered per sequence
    query_positions: torch.Tensor  # [Sp, Qmax] grid query positions (padding: -1)
    kv_lens: torch.Tensor  # [Sp]
    prefix_ids: torch.Tensor | None = None  # [Pb] the shared blocks; None: no prefix
    prefix_first: int | None = None  # the first shared block when the ids are consecutive (a view)
    _own_masks: dict[tuple[int | None, int], torch.Tensor] = field(default_factory=dict)
    _prefix_masks: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)

    def own_mask(self, window: int | None, group: int, dtype: torch.dtype) -> torch.Tensor:
        """Additive [Sp, 1, G*Qmax, Ls]: causal by absolute position, padding keys hidden, keys
        `window` or more positions back hidden; padding queries see their first key."""
        cached = self._own_masks.get((window, group))
        if cached is None:
            key_pos = self.own_start + torch.arange(self.max_own, device=self.kv_lens.device)
            q = self.query_positions[:, :, None]
            allowed = (key_pos <= q) & (key_pos < self.kv_lens[:, None, None])
            if window is not None:
                allowed &= key_pos > q - window
            allowed[:, :, 0] |= self.query_positions < 0
            s, qmax, length = allowed.shape
            allowed = allowed[:, None].expand(-1, group, -1, -1).reshape(s, 1, group * qmax, length)
            cached = additive(allowed, dtype)
            self._own_masks[(window, group)] = cached
        return cached

    def prefix_kv(self, pool: KVPool, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """[1, Hkv, Lp, D] keys and values of the shared prefix."""
        assert self.prefix_ids is not None
        k_blocks, v_blocks = pool.blocks(layer)
        n = self.prefix_ids.numel()
        if self.prefix_first is not None:
            k = k_blocks[self.prefix_first : self.prefix_first + n]
            v = v_blocks[self.prefix_first : self.prefix_first + n]
        else:
            k, v = k_blocks.index_select(0, self.prefix_ids), v_blocks.index_select(0, self.prefix_ids)
        rows = (-1, *k.shape[2:])
        return k.reshape(rows).transpose(0, 1)[None], v.reshape(rows).transpose(0, 1)[None]

    def prefix_mask(
        self, window: int, group: int, tokens: int, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """An additive [1, 1, Sp*G*Qmax, Lp] mask hiding prefix keys `window` or more positions
        back, and the rows it leaves without any key ([1, 1, Sp*G*Qmax]). Rows are ordered
        (sequence, query head of the KV head, query); padding queries see every key."""
        cached = self._prefix_masks.get((window, group))
        if cached is None:
            key_pos = torch.arange(tokens, device=self.query_positions.device)
            q = self.query_positions[:, None, :, None]  # [Sp, 1, Qmax, 1]
            allowed = (key_pos > q - window) | (q < 0)
            allowed = allowed.expand(-1, group, -1, -1).reshape(1, 1, -1, tokens)
            cached = (additive(allowed, dtype), ~allowed.any(-1))
            self._prefix_masks[(window, group)] = cached
        return cached


def additive(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(~allowed, -torch.inf)


def attend(
    query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor | None, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention with its log-sum-exp: q [B, Hkv, M, D], k/v [B, Hkv, L, D], an additive
    mask [B, 1, M, L] -> out [B, Hkv, M, D], lse [B, Hkv, M] (fp32)."""
    if query.device.type == "cpu":
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            query, keys, values, 0.0, False, attn_mask=mask, scale=scale
        )
        return out, lse
    scores = torch.matmul(query.float(), keys.float().transpose(-1, -2)) * scale
    if mask is not None:
        scores = scores + mask
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.exp(scores - lse.nan_to_num(neginf=0.0)[..., None])
    return torch.matmul(probs, values.float()).to(query.dtype), lse


def cascade_attention(
    grid: torch.Tensor, parts: list[Part], pool: KVPool, layer: int, scale: float, window: int | None
) -> torch.Tensor:
    """grid [S, Qmax, H, D] -> [S, Qmax, H, D]."""
    s, qmax, heads, dim = grid.shape
    k_blocks, v_blocks = pool.blocks(layer)
    kv_heads = k_blocks.shape[2]
    group = heads // kv_heads
    # Query head h reads KV head h // group: [S, Hkv, G*Qmax, D], rows (head in group, query).
    q = (
        grid.view(s, qmax, kv_heads, group, dim)
        .permute(0, 2, 3, 1, 4)
        .reshape(s, kv_heads, group * qmax, dim)
    )
    out = q if len(parts) == 1 and parts[0].seqs is None else torch.empty_like(q)
    for part in parts:
        pq = q if part.seqs is None else q.index_select(0, part.seqs)
        own = (pq.shape[0], -1, kv_heads, dim)
        keys = k_blocks.index_select(0, part.own_tables).view(own)[:, : part.max_own].transpose(1, 2)
        values = v_blocks.index_select(0, part.own_tables).view(own)[:, : part.max_own].transpose(1, 2)
        o_out, o_lse = attend(pq, keys, values, part.own_mask(window, group, grid.dtype), scale)
        if part.prefix_ids is not None:
            o_out, _ = merge(o_out, o_lse, *prefix_attention(pq, part, pool, layer, scale, window, qmax))
        if part.seqs is None:
            out = o_out
        else:
            out.index_copy_(0, part.seqs, o_out)
    return out.view(s, kv_heads, group, qmax, dim).permute(0, 3, 1, 2, 4).reshape(s, qmax, heads, dim)


def prefix_attention(
    pq: torch.Tensor, part: Part, pool: KVPool, layer: int, scale: float, window: int | None, qmax: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The members' queries pq [Sp, Hkv, G*Qmax, D] against their shared prefix, read once for all
    of them -> out [Sp, Hkv, G*Qmax, D], lse [Sp, Hkv, G*Qmax]."""
    members, kv_heads, rows_per_seq, dim = pq.shape
    pk, pv = part.prefix_kv(pool, layer)
    rows = pq.transpose(0, 1).reshape(1, kv_heads, -1, dim)
    if window is None:
        p_out, p_lse = attend(rows, pk, pv, None, scale)
    else:
        mask, empty = part.prefix_mask(window, rows_per_seq // qmax, pk.shape[2], pq.dtype)
        p_out, p_lse = attend(rows, pk, pv, mask, scale)
        p_lse = p_lse.masked_fill(empty, -torch.inf)
    p_out = p_out.view(kv_heads, members, rows_per_seq, dim).transpose(0, 1)
    return p_out, p_lse.view(kv_heads, members, rows_per_seq).transpose(0, 1)


def merge(
    out: torch.Tensor, lse: torch.Tensor, other: torch.Tensor, other_lse: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Two softmax attentions over disjoint keys, [..., D] with their log-sum-exps [...], as one."""
    top = torch.maximum(lse, other_lse)
    w, w_other = torch.exp(lse - top), torch.exp(other_lse - top)
    total = w + w_other
    merged = (out * w[..., None] + other * w_other[..., None]) / total[..., None]
    return merged.to(out.dtype), top + torch.log(total)


def paged_decode_attention(
    query: torch.Tensor, rows: DecodeRows, pool: KVPool, layer: int, scale: float, window: int | None
) -> torch.Tensor:
    """A decode step (one query per sequence) through the native kernels: query [S, H, D] ->
    [S, H, D]. Each sequence's own keys are read in place; a shared prefix, once for its members
    (as in `cascade_attention`), and merged in."""
    keys, values = pool.keys[layer], pool.values[layer]
    q = query.to(torch.float32).contiguous()
    out, lse = rows.kernel(
        q, keys, values, rows.tables, rows.starts, rows.ends, pool.block_size, window, scale
    )
    if rows.prefixes is not None:
        rows.kernel.merge_prefixes(
            q, out, lse, rows.prefixes, keys, values, rows.ends, pool.block_size, window, scale
        )
    return out.to(query.dtype)
