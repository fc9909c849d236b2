"""The engine's half of KV offload: reclaimed blocks come out as exact host copies with their
chain position, and installing them back makes the next admission reuse them.

No tier here (tests/service/test_hmt.py runs the whole path through real services).
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoTokenizer

from wicore.config import load_config
from wicore.kv.attention import Observation
from wicore.kv.hashing import BlockHash, chain_hashes
from wicore.worker.app import load_model
from wicore.worker.engine_types import EngineRequest, StepOutput
from wicore.worker.kv_io import Spilled, read_blocks
from wicore.worker.paged_engine import EngineConfig, PagedEngine

LONG = "Paged attention keeps the KV cache in fixed-size blocks, and WiCore spills them to RAM and NVMe."


def make_engine(model_dir: Path, num_blocks: int) -> PagedEngine:
    loaded = load_model(load_config(None, {}, {"worker.model": str(model_dir)}))
    return PagedEngine(loaded.model, EngineConfig(num_blocks=num_blocks, block_size=4), loaded.fingerprint)


def run(engine: PagedEngine, request: EngineRequest) -> list[StepOutput]:
    engine.add_request(request)
    outputs: list[StepOutput] = []
    for _ in range(1000):
        if not engine.has_unfinished():
            break
        outputs += engine.step()
        engine.pool.check_integrity()
    assert not engine.has_unfinished()
    return outputs


def generated(outputs: list[StepOutput]) -> list[int]:
    return [t for out in outputs for t in out.new_token_ids]


def test_reclaimed_blocks_come_back_exactly_and_are_reused(tiny_llama_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    ids = list(tokenizer(LONG).input_ids)
    engine = make_engine(tiny_llama_dir, num_blocks=-(-(len(ids) + 8) // 4))
    spilled: dict[BlockHash, Spilled] = {}
    engine.enable_offload(lambda blocks: spilled.update({b.block_hash: b for b in blocks}))

    first = run(engine, EngineRequest("a", ids, 8))
    chain = engine.prefix_chain(EngineRequest("c", ids, 1))
    assert len(chain) >= 5 and all(engine.pool.contains(h) for h in chain)
    kv_on_device = read_blocks(engine.runner.pool, [engine.pool._by_hash[h] for h in chain])
    other = [(t + 1) % len(tokenizer) for t in ids]  # as long as a's prompt, other tokens
    run(engine, EngineRequest("other", other, 8))  # needs the whole pool: a's cached blocks are reclaimed
    assert not any(engine.pool.contains(h) for h in chain)
    assert set(chain) <= set(spilled)
    for position, h in enumerate(chain):
        assert spilled[h].position == position
        assert torch.equal(spilled[h].kv, kv_on_device[position])  # a copy taken before reuse

    assert engine.install_blocks(chain, 0, [spilled[h].kv for h in chain]) == len(chain)
    assert engine.install_blocks(chain, 0, [spilled[h].kv for h in chain]) == 0  # already there
    engine.pool.check_integrity()
    again = run(engine, EngineRequest("a2", ids, 8))
    assert again[-1].cached_tokens == len(chain) * 4
    assert generated(again) == generated(first)


def test_install_stops_when_the_pool_is_full(tiny_llama_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    ids = list(tokenizer(LONG).input_ids)
    engine = make_engine(tiny_llama_dir, num_blocks=3)
    chain = engine.prefix_chain(EngineRequest("c", ids, 1))
    shape = (len(engine.runner.pool.keys), 2, 4, *engine.runner.pool.keys[0].shape[1:])
    kv = [torch.zeros(shape) for _ in chain]
    assert engine.install_blocks(chain, 0, kv) == 3
    assert [engine.pool.contains(h) for h in chain[:4]] == [True, True, True, False]
    engine.pool.check_integrity()


def test_sampled_steps_report_each_hashed_blocks_share_of_attention(tiny_llama_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    ids = list(tokenizer(LONG).input_ids)
    loaded = load_model(load_config(None, {}, {"worker.model": str(tiny_llama_dir)}))
    config = EngineConfig(num_blocks=64, block_size=4, attention_sample_every=2)
    engine = PagedEngine(loaded.model, config, loaded.fingerprint)
    seen: list[list[Observation]] = []
    engine.enable_offload(lambda blocks: None, seen.append)
    outputs = run(engine, EngineRequest("a", ids, 6))
    assert len(seen) == engine.num_steps // 2 > 0  # one batch of observations per sampled step
    chain = set(
        engine.prefix_chain(EngineRequest("c", ids + generated(outputs) + [0], 1))
    )  # every full block
    for step in seen:
        assert {o.block_hash for o in step} <= chain  # only hashed (full) blocks
        assert all(0.0 <= o.mass <= 1.0 for o in step) and sum(o.mass for o in step) <= 1.0 + 1e-5
        assert len({o.blocks_in_sequence for o in step}) == 1
    last = seen[-1]
    assert last[0].blocks_in_sequence == -(-(len(ids) + 5) // 4)  # kv length when it was measured
    observed = [b for b in engine.pool.blocks if b.observations > 0]
    assert observed and all(b.block_hash is not None for b in observed)


def test_install_never_reclaims_the_device_blocks_it_extends(tiny_llama_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    chain = make_engine(tiny_llama_dir, num_blocks=1).prefix_chain(
        EngineRequest("c", list(tokenizer(LONG).input_ids), 1)
    )
    engine = make_engine(tiny_llama_dir, num_blocks=4)
    shape = (len(engine.runner.pool.keys), 2, 4, *engine.runner.pool.keys[0].shape[1:])
    kv = [torch.full(shape, float(i)) for i in range(len(chain))]
    assert engine.install_blocks(chain, 0, kv[:1]) == 1  # block 0 is on the device, cached
    # Blocks 1.. come back from a tier: only 3 fit beside block 0, which must stay.
    assert engine.install_blocks(chain, 1, kv[1:6]) == 3
    assert [engine.pool.contains(h) for h in chain[:5]] == [True, True, True, True, False]
    ids = [engine.pool._by_hash[h] for h in chain[:4]]
    assert [float(t[0, 0, 0, 0, 0]) for t in read_blocks(engine.runner.pool, ids)] == [0.0, 1.0, 2.0, 3.0]
    engine.pool.check_integrity()


def test_a_prompt_is_hashed_once_and_given_hashes_are_used_as_they_are(tiny_llama_dir: Path) -> None:
    """The scheduler's hashes of the prompt (EngineRequest.block_hashes) key the request's blocks
    as given: deliberately different ones show up in the pool, so nothing re-hashed them; the
    blocks after them are hashed by the engine, continuing the given chain."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    ids = list(tokenizer(LONG).input_ids)
    engine = make_engine(tiny_llama_dir, num_blocks=64)
    true_chain = engine.prefix_chain(EngineRequest("t", ids, 1))
    assert len(true_chain) >= 3
    given = [BlockHash(f"{i:032x}") for i in range(2)]  # not the true hashes of blocks 0 and 1
    request = EngineRequest("a", ids, 4, block_hashes=list(given))
    run(engine, request)
    assert all(engine.pool.contains(h) for h in given)
    assert not engine.pool.contains(true_chain[0])
    expected_next = chain_hashes(bytes.fromhex(given[-1]), ids[8:12], 4)[0]  # block 2 (block_size 4)
    assert engine.pool.contains(expected_next)
