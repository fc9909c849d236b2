"""Runs one packed forward pass of a Hugging Face decoder over the paged KV pool."""

from __future__ import annotations

from collections.abc import Sequence as Seq
from typing import Any

import torch

from wicore.config import AttentionBackend, ModelImpl
from wicore.errors import ConfigError
from wicore.worker.batch_scheduler import ScheduledSeq
from wicore.worker.cascade import DecodeRows, Part, PrefixTables, shared_prefixes
from wicore.worker.decoder import Decoder
from wicore.worker.native import PagedDecode, decode_kernel
from wicore.worker.paged_attention import KVPool, PagedCache, StepMetadata, register

# Families whose attention the paged path reproduces exactly (tested against generate()).
SUPPORTED_MODEL_TYPES = ("gemma3_text", "llama", "mistral", "qwen2", "qwen3")


def text_config(model: Any) -> Any:
    config = model.config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def check_supported(model: Any) -> None:
    """Refuses, at load, any model the paged attention would serve wrong."""
    model_type = getattr(model.config, "model_type", "?")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ConfigError(
            f"worker.model: architecture {model_type!r} is not supported by the paged engine "
            f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)})"
        )
    if getattr(text_config(model), "attn_logit_softcapping", None):
        raise ConfigError("worker.model: attention logit soft-capping is not supported by the paged engine")


def kv_layout(model: Any) -> tuple[int, int, int]:
    """(layers, kv heads, head dim) of the model's attention."""
    cfg = text_config(model)
    heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    return cfg.num_hidden_layers, getattr(cfg, "num_key_value_heads", None) or heads, head_dim


class ModelRunner:
    """Owns the model and the KV pool; turns a scheduled batch into next-token logits."""

    def __init__(
        self,
        model: Any,
        num_blocks: int,
        block_size: int,
        attention_backend: AttentionBackend = AttentionBackend.AUTO,
        model_impl: ModelImpl = ModelImpl.AUTO,
        kernel_dir: str | None = None,
    ) -> None:
        check_supported(model)
        self.model = model
        # WiCore's own forward pass where the family has one; transformers' modules otherwise.
        use_own = ModelImpl(model_impl) is ModelImpl.AUTO and Decoder.supports(model)
        self.decoder = Decoder(model, kernel_dir) if use_own else None
        self.device = next(model.parameters()).device
        layers, kv_heads, head_dim = kv_layout(model)
        self.attention_backend, self.decode_kernel = self._backend(
            AttentionBackend(attention_backend), kernel_dir, kv_heads, head_dim
        )
        self.pool = KVPool(layers, num_blocks, block_size, kv_heads, head_dim, model.dtype, self.device)
        self.block_size = block_size
        model.set_attn_implementation(register())

    def _backend(
        self, backend: AttentionBackend, kernel_dir: str | None, kv_heads: int, head_dim: int
    ) -> tuple[AttentionBackend, PagedDecode | None]:
        """The backend `auto` stands for here, and the native kernel when it is `paged`."""
        if backend not in (AttentionBackend.AUTO, AttentionBackend.PAGED):
            return backend, None
        heads = text_config(self.model).num_attention_heads
        fits = self.device.type == "cpu" and PagedDecode.supports(heads, kv_heads, head_dim, self.model.dtype)
        kernel = decode_kernel(kernel_dir) if fits else None
        if kernel is not None:
            return AttentionBackend.PAGED, kernel
        if backend is AttentionBackend.PAGED:
            raise ConfigError(
                "worker.attention_backend: paged needs a CPU worker with fp32 or bf16 weights, head dims a "
                "multiple of 16 up to 256 and a C compiler to build its kernel (the log says which is "
                "missing); use auto or cascade"
            )
        return AttentionBackend.CASCADE, None

    def metadata(
        self, batch: Seq[ScheduledSeq]
    ) -> tuple[torch.Tensor, torch.Tensor, StepMetadata, torch.Tensor]:
        """input_ids [T], positions [T], the step metadata and the packed index of each sampled token
        (a sequence with proposals samples at each of them and after the last)."""
        bs = self.block_size
        num_seqs = len(batch)
        max_query = max(item.num_tokens for item in batch)
        kv_lens = [item.seq.num_computed + item.num_tokens for item in batch]
        max_kv = max(kv_lens)
        max_blocks = -(-max_kv // bs)
        tokens: list[int] = []
        positions: list[int] = []
        to_grid: list[int] = []
        rows: list[int] = []
        seq_of_token: list[int] = []
        tables = torch.zeros(num_seqs, max_blocks, dtype=torch.long)
        block_lists: list[list[int]] = []
        query_positions = torch.full((num_seqs, max_query), -1, dtype=torch.long)
        for i, item in enumerate(batch):
            seq, start, n = item.seq, item.seq.num_computed, item.num_tokens
            tokens += seq.token_ids[start : start + n - len(item.proposed)]
            tokens += item.proposed
            positions += range(start, start + n)
            to_grid += range(i * max_query, i * max_query + n)
            seq_of_token += [i] * n
            needed = -(-kv_lens[i] // bs)
            block_lists.append(seq.block_ids[:needed])
            tables[i, :needed] = torch.tensor(block_lists[-1], dtype=torch.long)
            query_positions[i, :n] = torch.arange(start, start + n)
            if item.samples:
                rows += range(len(tokens) - 1 - len(item.proposed), len(tokens))
        key_slots = (tables[:, :, None] * bs + torch.arange(bs)).view(num_seqs, max_blocks * bs)[:, :max_kv]
        pos = torch.tensor(positions, dtype=torch.long)
        slot_mapping = key_slots[torch.tensor(seq_of_token), pos]
        dev = self.device
        block_tables = tables.to(dev)
        meta = StepMetadata(
            pool=self.pool,
            slot_mapping=slot_mapping.to(dev),
            packed_to_grid=torch.tensor(to_grid, dtype=torch.long, device=dev),
            block_tables=block_tables,
            flat_tables=block_tables.view(-1),
            query_positions=query_positions.to(dev),
            kv_lens=torch.tensor(kv_lens, dtype=torch.long, device=dev),
            num_seqs=num_seqs,
            max_query=max_query,
            max_kv=max_kv,
        )
        if any(item.proposed for item in batch):
            meta.probe_positions = query_positions.clone()
            for i, item in enumerate(batch):
                if item.proposed:
                    meta.probe_positions[i, item.num_tokens - len(item.proposed) : item.num_tokens] = -1
            meta.probe_positions = meta.probe_positions.to(dev)
        groups: list[tuple[list[int], int]] = []
        if self.attention_backend in (AttentionBackend.CASCADE, AttentionBackend.PAGED):
            computed = [item.seq.num_computed for item in batch]
            groups = shared_prefixes(block_lists, computed, bs)
        if self.decode_kernel is not None and max_query == 1:  # the native kernels, prefixes included
            starts = [0] * num_seqs
            for members, n in groups:
                for i in members:
                    starts[i] = n * bs  # its own part begins after the prefix
            meta.decode = DecodeRows(
                kernel=self.decode_kernel,
                tables=block_tables,
                starts=torch.tensor(starts, dtype=torch.long),
                ends=meta.kv_lens,
                prefixes=PrefixTables.of([(members, block_lists[members[0]][:n]) for members, n in groups]),
            )
        elif groups:
            meta.cascade = self.cascade(groups, block_lists, kv_lens, meta.query_positions)
        ids = torch.tensor(tokens, dtype=torch.long, device=dev)
        return ids, pos.to(dev), meta, torch.tensor(rows, dtype=torch.long, device=dev)

    def cascade(
        self,
        groups: list[tuple[list[int], int]],
        tables: list[list[int]],
        kv_lens: list[int],
        query_positions: torch.Tensor,
    ) -> list[Part]:
        """One part per shared prefix (its sequences), and one for the sequences that share none."""
        grouped = {i for members, _ in groups for i in members}
        alone = [i for i in range(len(tables)) if i not in grouped]
        parts = [self._part(members, n, tables, kv_lens, query_positions) for members, n in groups]
        if alone:
            parts.append(self._part(alone, 0, tables, kv_lens, query_positions))
        if len(parts) == 1:
            parts[0].seqs = None  # the whole batch in order: no indexing
        return parts

    def _part(
        self,
        members: list[int],
        shared: int,
        tables: list[list[int]],
        kv_lens: list[int],
        positions: torch.Tensor,
    ) -> Part:
        bs, dev = self.block_size, self.device
        own = torch.zeros(len(members), max(len(tables[i]) - shared for i in members), dtype=torch.long)
        for row, i in enumerate(members):
            rest = tables[i][shared:]
            own[row, : len(rest)] = torch.tensor(rest, dtype=torch.long)
        seqs = torch.tensor(members, dtype=torch.long, device=dev)
        part = Part(
            seqs=seqs,
            own_tables=own.view(-1).to(dev),
            own_start=shared * bs,
            max_own=max(kv_lens[i] for i in members) - shared * bs,
            query_positions=positions.index_select(0, seqs),
            kv_lens=torch.tensor([kv_lens[i] for i in members], dtype=torch.long, device=dev),
        )
        if shared:
            ids = tables[members[0]][:shared]
            part.prefix_ids = torch.tensor(ids, dtype=torch.long, device=dev)
            part.prefix_first = ids[0] if ids == list(range(ids[0], ids[0] + shared)) else None
        return part

    @property
    def probe_layer(self) -> int:
        """The layer whose attention the A²CR probe measures: the middle one."""
        return len(self.pool.keys) // 2

    @torch.inference_mode()
    def run(self, batch: Seq[ScheduledSeq], probe: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits [R, vocab] (fp32) for the sequences of `batch` that sample, in batch order (one
        row per proposal and one after, for a sequence with proposals), and
        with `probe`, the attention mass [S, Lmax] each key received on the probe layer."""
        ids, positions, meta, rows = self.metadata(batch)
        if probe:
            meta.probe_layer = self.probe_layer
        if rows.numel() == 0:
            rows = rows.new_tensor([ids.shape[0] - 1])  # nothing samples: keep one row, cheaply
        if self.decoder is not None:
            logits = self.decoder(ids, positions, meta, rows).float()
            return (logits if any(item.samples for item in batch) else logits[:0]), meta.key_mass
        out = self.model(
            input_ids=ids[None],
            position_ids=positions[None],
            cache=PagedCache(meta),
            use_cache=True,
            logits_to_keep=rows,
            wicore_meta=meta,
        )
        logits = out.logits[0].float()
        return (logits if any(item.samples for item in batch) else logits[:0]), meta.key_mass
