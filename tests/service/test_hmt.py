"""KV offload end to end, as processes (`wicore up`: gateway, scheduler, worker, tier, Redis):
a prefix pushed out of a deliberately tiny device pool comes back from the CPU tier or
from NVMe instead of being recomputed, and the greedy output is unchanged (lossless
"raw" codecs here; the lossy ones are measured by benchmark/fidelity_bench.py).
"""

from __future__ import annotations

import asyncio
import os
import random
import shutil
import signal
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families
from transformers import AutoTokenizer

from wicore.kv.hashing import reusable_chain
from wicore.model_files import fingerprint, resolve_model
from wicore.redis_keys import block_key
from wicore.redis_server import start_private_redis
from wicore.v1 import inference_pb2 as pb
from wicore.v1 import inference_pb2_grpc, scheduler_pb2, scheduler_pb2_grpc, tier_pb2, tier_pb2_grpc

from stack import Stack, pid_listening_on, start_stack, until

BLOCK = 16
BLOCK_BYTES = 2 * 4 * BLOCK * 2 * 16 * 4  # tiny Llama: 4 layers, 2 KV heads of 16, fp32
POOL_BLOCKS = 11  # 176 tokens: one long prompt at a time, all of it
LONG = [  # about 160 tokens each: with 12 new tokens, most of the pool
    3 * "Paged attention keeps the KV cache in blocks of sixteen tokens; WiCore spills them to RAM. ",
    3 * "def add(a, b):\n    return a + b\n\nclass Tier:  # KV blocks, CPU then NVMe\n",
    3 * "The quick brown fox jumps over the lazy dog while the scheduler routes requests to workers. ",
]


def settings(where: str) -> dict[str, object]:
    common: dict[str, object] = {
        "worker.kv_cache_bytes": POOL_BLOCKS * BLOCK_BYTES,
        "worker.cpu_kernels": "default",
        "tier.cpu_codec": "raw",
        "tier.nvme_codec": "raw",
        "a2cr_config.cleanup_interval": 0.5,
        "worker.attention_sample_every": 1,
    }
    if where == "cpu":
        return {**common, "tier.cpu_capacity_bytes": 64 << 20, "tier.nvme_capacity_bytes": 0}
    return {**common, "tier.cpu_capacity_bytes": 0, "tier.nvme_capacity_bytes": 64 << 20}


@pytest.fixture(scope="module", params=["cpu", "nvme"])
def stack(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    tiny_llama_dir: Path,
    redis_url: str,
) -> Iterator[Stack]:
    s = start_stack(tmp_path_factory.mktemp(f"hmt-{request.param}"), str(tiny_llama_dir), redis_url,
                    settings=settings(request.param))  # fmt: skip
    yield s
    assert s.stop() == 0, s.log()[-3000:]


@pytest.fixture()
def where(request: pytest.FixtureRequest) -> str:
    """The tier this module's stack offloads to ("cpu" or "nvme")."""
    return str(request.node.callspec.params["stack"])


@pytest.fixture()
async def client(stack: Stack) -> AsyncIterator[inference_pb2_grpc.InferenceStub]:
    async with grpc.aio.insecure_channel(stack.gateway) as channel:
        yield inference_pb2_grpc.InferenceStub(channel)


@pytest.fixture()
async def tier(stack: Stack) -> AsyncIterator[tier_pb2_grpc.TierStub]:
    async with stack.internal_channel(stack.tier) as channel:
        yield tier_pb2_grpc.TierStub(channel)


async def generate(client: inference_pb2_grpc.InferenceStub, prompt: str) -> pb.GenerateResponse:
    request = pb.GenerateRequest(prompt=prompt, max_tokens=12, sampling=pb.SamplingParams(temperature=0.0))
    return await client.Generate(request, timeout=60)


async def push_out(client: inference_pb2_grpc.InferenceStub, keep: str) -> None:
    """Runs never-seen prompts as long as `keep`: each needs most of the pool, so `keep`'s cached
    blocks are all reclaimed (and spilled)."""
    for _ in range(2):  # the second takes what the first left (the pool reclaims LRU, tails first)
        filler = "".join(random.choice("abcdefgh") for _ in range(8)) + keep[8:]
        await generate(client, filler)


def full_blocks(response: pb.GenerateResponse) -> int:
    return (response.usage.prompt_tokens - 1) // BLOCK


async def test_a_pushed_out_prefix_comes_back_from_the_tier(
    client: inference_pb2_grpc.InferenceStub,
    tier: tier_pb2_grpc.TierStub,
    tiny_llama_dir: Path,
    stack: Stack,
    where: str,
) -> None:
    prompt = LONG[0]
    first = await generate(client, prompt)
    assert first.usage.cached_tokens == 0 and full_blocks(first) >= 4
    await push_out(client, prompt)
    await in_tier(tier, tiny_llama_dir, prompt, full_blocks(first))
    again = await generate(client, prompt)
    assert again.usage.cached_tokens == full_blocks(first) * BLOCK  # loaded, not recomputed
    assert again.text == first.text and list(again.token_ids) == list(first.token_ids)

    async def reported() -> bool:  # the worker's heartbeat carries its offload counters
        async with stack.internal_channel(stack.scheduler) as channel:
            reply = await scheduler_pb2_grpc.SchedulerStub(channel).ListWorkers(
                scheduler_pb2.ListWorkersRequest()
            )
        load = reply.workers[0].load
        return (
            load.loaded_blocks[where] >= full_blocks(first)
            and load.spilled_blocks >= full_blocks(first)
            and load.prefill_tokens_per_s > 0  # what it measured, for the router's tier prices
            and load.load_s_per_block[where] > 0
        )

    await until(reported, f"the worker to report blocks loaded from {where}, and its measured costs")
    with urllib.request.urlopen(f"http://{stack.metrics['worker-0']}/metrics", timeout=10) as reply:
        families = {f.name: f for f in text_string_to_metric_families(reply.read().decode())}
    assert families["wicore:prefill_tokens_per_second"].samples[0].value > 0
    (load_s,) = [s for s in families["wicore:kv_block_load_seconds"].samples if s.labels["source"] == where]
    assert load_s.value > 0
    # worker.tier_loads is "always" in the tests' stacks: nothing was declined
    assert families["wicore:kv_blocks_load_declined"].samples[0].value == 0


async def test_partial_hit_loads_up_to_the_gap(
    client: inference_pb2_grpc.InferenceStub, tier: tier_pb2_grpc.TierStub, tiny_llama_dir: Path
) -> None:
    prompt = LONG[1]
    first = await generate(client, prompt)
    await push_out(client, prompt)
    chain = await in_tier(tier, tiny_llama_dir, prompt, full_blocks(first))
    dropped = await tier.Drop(tier_pb2.DropRequest(block_hashes=[chain[2]]), timeout=10)
    assert dropped.dropped == 1
    again = await generate(client, prompt)
    assert again.usage.cached_tokens == 2 * BLOCK  # blocks 0 and 1; 2 and after are recomputed
    assert again.text == first.text


async def in_tier(tier: tier_pb2_grpc.TierStub, model_dir: Path, prompt: str, n: int) -> list[str]:
    """Waits until the tier holds the prompt's first n blocks (hashed as the worker does); their hashes."""
    ids = list(AutoTokenizer.from_pretrained(model_dir)(prompt).input_ids)
    model = fingerprint(resolve_model(str(model_dir), model_dir), "float32")
    chain = reusable_chain(model, "", ids, BLOCK)[:n]

    async def present() -> bool:
        lookup = await tier.Lookup(tier_pb2.LookupRequest(block_hashes=chain), timeout=10)
        return lookup.prefix_blocks == n

    await until(present, f"the tier to hold the prompt's {n} blocks")
    return list(chain)


async def test_two_requests_racing_for_one_prefix_load_it_once(
    client: inference_pb2_grpc.InferenceStub, tier: tier_pb2_grpc.TierStub, tiny_llama_dir: Path
) -> None:
    prompt = LONG[2]
    first = await generate(client, prompt)
    await push_out(client, prompt)
    await in_tier(tier, tiny_llama_dir, prompt, full_blocks(first))
    before = await tier.Stats(tier_pb2.StatsRequest(), timeout=10)
    a, b = await asyncio.gather(generate(client, prompt), generate(client, prompt))
    after = await tier.Stats(tier_pb2.StatsRequest(), timeout=10)
    assert a.text == b.text == first.text
    assert a.usage.cached_tokens == b.usage.cached_tokens == full_blocks(first) * BLOCK
    hits = sum(t.hits for t in after.tiers) - sum(t.hits for t in before.tiers)
    assert hits == full_blocks(first), (before, after)  # one load served both


async def test_tier_killed_mid_spill_worker_keeps_serving(
    client: inference_pb2_grpc.InferenceStub, tier: tier_pb2_grpc.TierStub, stack: Stack, tiny_llama_dir: Path
) -> None:
    prompt = LONG[0]
    first = await generate(client, prompt)
    tier_port = int(stack.tier.rsplit(":", 1)[1])
    os.kill(pid_listening_on(stack.proc.pid, tier_port), signal.SIGKILL)
    for p in LONG[1:]:  # spills now fail: the worker drops them and keeps answering
        assert (await generate(client, p)).usage.completion_tokens == 12
    again = await generate(client, prompt)
    assert again.text == first.text  # recomputed (or reloaded from a restarted tier), never corrupt
    await until(lambda: _tier_serving(tier), "`wicore up` to restart the tier", timeout_s=30)
    await asyncio.sleep(1.2)  # the worker's tier client retries after 1 s
    first = await generate(client, prompt)
    await push_out(client, prompt)
    await in_tier(tier, tiny_llama_dir, prompt, full_blocks(first))  # offload resumed
    again = await generate(client, prompt)
    assert again.text == first.text and again.usage.cached_tokens == full_blocks(first) * BLOCK


async def _tier_serving(tier: tier_pb2_grpc.TierStub) -> bool:
    try:
        await tier.Stats(tier_pb2.StatsRequest(), timeout=2)
    except grpc.aio.AioRpcError:
        return False
    return True


async def test_attention_measured_on_the_device_reaches_the_tiers_scores(
    client: inference_pb2_grpc.InferenceStub,
    tier: tier_pb2_grpc.TierStub,
    stack: Stack,
    tiny_llama_dir: Path,
    redis_url: str,
) -> None:
    prompt = LONG[2]
    first = await generate(client, prompt)
    await push_out(client, prompt)
    chain = await in_tier(tier, tiny_llama_dir, prompt, full_blocks(first))
    keys = [block_key(stack.namespace, "local", h) for h in chain]
    with redis.Redis.from_url(redis_url, decode_responses=True) as r:

        async def observed() -> bool:
            return all(int(r.hget(k, "observations") or 0) >= 1 for k in keys)

        await until(observed, "the blocks' attention observations in Redis")
        attention = [float(r.hget(k, "attention") or 0.5) for k in keys]
    assert all(0.0 <= a <= 1.0 for a in attention) and len(set(attention)) > 1  # measured, not the prior


async def test_redis_stopped_and_restarted_offload_goes_on(
    tmp_path: Path, tiny_llama_dir: Path, redis_url: str
) -> None:
    """Redis is only a mirror for offload: with it down, spills and reloads go on, and the tier
    rewrites its metadata when Redis returns (empty: restarted without its data)."""
    redis_dir = tmp_path / "redis-state"
    proc, private_url = start_private_redis(redis_dir)
    (tmp_path / "stack").mkdir()
    stack = await asyncio.to_thread(
        start_stack, tmp_path / "stack", str(tiny_llama_dir), private_url, settings=settings("cpu")
    )
    try:
        async with (
            grpc.aio.insecure_channel(stack.gateway) as gateway,
            stack.internal_channel(stack.tier) as tier_channel,
        ):
            client = inference_pb2_grpc.InferenceStub(gateway)
            tier = tier_pb2_grpc.TierStub(tier_channel)
            prompt = LONG[0]
            first = await generate(client, prompt)
            proc.terminate()
            proc.wait(timeout=10)
            await push_out(client, prompt)
            chain = await in_tier(tier, tiny_llama_dir, prompt, full_blocks(first))
            again = await generate(client, prompt)
            assert again.text == first.text and again.usage.cached_tokens == full_blocks(first) * BLOCK
            assert not (await tier.Stats(tier_pb2.StatsRequest(), timeout=10)).redis_ok

            shutil.rmtree(redis_dir / "redis")
            proc, private_url = start_private_redis(redis_dir)
            with redis.Redis.from_url(private_url, decode_responses=True) as r:

                async def mirrored() -> bool:
                    return all(r.exists(block_key(stack.namespace, "local", h)) for h in chain)

                await until(mirrored, "the tier to rewrite its metadata into the new Redis")
    finally:
        assert await asyncio.to_thread(stack.stop) == 0, stack.log()[-3000:]
        proc.terminate()
        proc.wait(timeout=10)
