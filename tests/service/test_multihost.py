"""Two "nodes" on loopback, laid out as on Kubernetes: each with its own worker and tier service,
one scheduler and gateway in front, one Redis shared.

Node 1 is a `wicore up` stack (gateway, scheduler, tier `local`, worker 0). Node 2 is a tier named
`node-2` and a worker started by hand: it binds 0.0.0.0, advertises 127.0.0.2 (as a pod advertises its
IP, not the address it binds), and spills to its own tier (`worker.tier_address`). The scheduler must
call the advertised address, learn which tier each worker reads, keep the two tiers' Redis records
apart, and send a returning prompt to the worker whose tier holds its prefix: a block in another
node's tier is a miss.
"""

from __future__ import annotations

import asyncio
import random
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import redis
import yaml
from transformers import AutoTokenizer

from wicore.channels import TOKEN_FILE
from wicore.kv.hashing import reusable_chain
from wicore.model_files import fingerprint, resolve_model
from wicore.redis_keys import block_key
from wicore.v1 import inference_pb2 as pb
from wicore.v1 import (
    inference_pb2_grpc,
    scheduler_pb2,
    scheduler_pb2_grpc,
    tier_pb2,
    tier_pb2_grpc,
    worker_pb2,
    worker_pb2_grpc,
)

from stack import Stack, free_port, start_stack, until
from tier_process import TierProcess, start_tier, stop, wait_up

BLOCK = 16
BLOCK_BYTES = 2 * 4 * BLOCK * 2 * 16 * 4  # tiny Llama: 4 layers, 2 KV heads of 16, fp32
POOL_BLOCKS = 11  # one long prompt at a time
PROMPT = 3 * "The quick brown fox jumps over the lazy dog while the scheduler routes requests to workers. "
SETTINGS: dict[str, object] = {
    "worker.kv_cache_bytes": POOL_BLOCKS * BLOCK_BYTES,
    "worker.cpu_kernels": "default",
    "tier.cpu_codec": "raw",
    "tier.nvme_capacity_bytes": 0,
}
NODE_2_HOST = "127.0.0.2"  # the second node's "pod IP": loopback, but not the address the worker binds


@dataclass
class TwoNodes:
    stack: Stack
    tier2: TierProcess
    worker2: subprocess.Popen[bytes]
    worker2_address: str


def start_worker(
    tmp: Path, stack: Stack, model: Path, tier: TierProcess, redis_url: str
) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    advertised = f"{NODE_2_HOST}:{port}"
    config = {
        "worker": {
            "host": "0.0.0.0",
            "port": port,
            "advertise_address": advertised,
            "tier_address": tier.address,
            "model": str(model),
            "kv_cache_bytes": POOL_BLOCKS * BLOCK_BYTES,
            "cpu_kernels": "default",
            "max_batch_size": 8,
        },
        "scheduler": {
            "host": "127.0.0.1",
            "port": int(stack.scheduler.rsplit(":", 1)[1]),
            "heartbeat_interval_s": 0.2,
            "worker_timeout_s": 2.0,
        },
        "redis": {"url": redis_url, "namespace": stack.namespace},
        "internal": {"token_file": str(stack.state_dir / TOKEN_FILE)},
        "state_dir": str(tmp / "state"),
        "observability": {"metrics_port": 0},
        "shutdown_grace_s": 2.0,
    }
    path = tmp / "worker2.yaml"
    path.write_text(yaml.safe_dump(config))
    log = open(tmp / "worker2.log", "wb")  # noqa: SIM115 - the child keeps it
    proc = subprocess.Popen(
        [sys.executable, "-m", "wicore.worker", "--config", str(path)], stdout=log, stderr=subprocess.STDOUT
    )
    return proc, advertised


@pytest.fixture(scope="module")
def nodes(
    tmp_path_factory: pytest.TempPathFactory, tiny_llama_dir: Path, redis_url: str
) -> Iterator[TwoNodes]:
    tmp = tmp_path_factory.mktemp("multihost")
    (tmp / "node1").mkdir()
    stack = start_stack(tmp / "node1", str(tiny_llama_dir), redis_url, settings=SETTINGS)
    (tmp / "node2").mkdir()
    tier2 = start_tier(tmp / "node2", redis_url, stack.namespace, node="node-2", cpu_capacity_bytes=64 << 20)
    try:
        asyncio.run(wait_up(tier2))
        worker2, address = start_worker(tmp / "node2", stack, tiny_llama_dir, tier2, redis_url)
    except BaseException:
        stop(tier2)
        stack.stop()
        raise
    yield TwoNodes(stack, tier2, worker2, address)
    worker2.terminate()
    worker2.wait(timeout=30)
    stop(tier2)
    assert stack.stop() == 0, stack.log()[-3000:]


async def list_workers(stack: Stack) -> list[scheduler_pb2.WorkerStatus]:
    async with stack.internal_channel(stack.scheduler) as channel:
        reply = await scheduler_pb2_grpc.SchedulerStub(channel).ListWorkers(
            scheduler_pb2.ListWorkersRequest()
        )
    return list(reply.workers)


@pytest.fixture(scope="module")
def tokenizer(tiny_llama_dir: Path) -> AutoTokenizer:
    return AutoTokenizer.from_pretrained(tiny_llama_dir)


@pytest.fixture()
async def registered(nodes: TwoNodes) -> AsyncIterator[dict[str, scheduler_pb2.WorkerStatus]]:
    """Both workers as the scheduler lists them, once each has learned its tier's name; by tier."""

    async def both_known() -> bool:
        workers = await list_workers(nodes.stack)
        return len(workers) == 2 and all(w.tier_node for w in workers)

    await until(both_known, "both workers to register with their tiers' names", 120)
    yield {w.tier_node: w for w in await list_workers(nodes.stack)}


async def test_each_worker_is_called_where_it_advertises_and_reads_its_own_tier(
    nodes: TwoNodes, registered: dict[str, scheduler_pb2.WorkerStatus]
) -> None:
    assert set(registered) == {"local", "node-2"}
    assert registered["node-2"].address == nodes.worker2_address  # not 0.0.0.0, not 127.0.0.1
    assert registered["node-2"].tier_address == nodes.tier2.address
    assert registered["local"].tier_address == nodes.stack.tier


async def generate(stack: Stack, prompt: str) -> pb.GenerateResponse:
    async with grpc.aio.insecure_channel(stack.gateway) as channel:
        request = pb.GenerateRequest(
            prompt=prompt, max_tokens=12, sampling=pb.SamplingParams(temperature=0.0)
        )
        return await inference_pb2_grpc.InferenceStub(channel).Generate(request, timeout=60)


async def push_out(stack: Stack, worker: str, tokenizer: AutoTokenizer, keep: str) -> None:
    """Never-seen prompts as long as `keep`, sent to `worker` itself (not through the scheduler, which
    might place them elsewhere): its pool reclaims `keep`'s blocks, which it spills to its tier."""
    async with stack.internal_channel(worker) as channel:
        stub = worker_pb2_grpc.WorkerStub(channel)
        for i in range(2):
            filler = "".join(random.choice("abcdefgh") for _ in range(8)) + keep[8:]
            request = worker_pb2.TokenizedRequest(
                request=pb.GenerateRequest(request_id=f"filler-{i}", max_tokens=12),
                prompt_token_ids=tokenizer(filler).input_ids,
            )
            async for _ in stub.Generate(request, timeout=60):
                pass


async def test_a_prefix_spilled_on_one_node_brings_its_request_back_there(
    nodes: TwoNodes,
    registered: dict[str, scheduler_pb2.WorkerStatus],
    tokenizer: AutoTokenizer,
    tiny_llama_dir: Path,
    redis_url: str,
) -> None:
    stack = nodes.stack
    first = await generate(stack, PROMPT)
    blocks = (first.usage.prompt_tokens - 1) // BLOCK
    assert first.usage.cached_tokens == 0 and blocks >= 4
    after = {w.tier_node: w.dispatched for w in await list_workers(stack)}
    (holder,) = [node for node, w in registered.items() if after[node] > w.dispatched]
    other = "node-2" if holder == "local" else "local"
    await push_out(stack, registered[holder].address, tokenizer, PROMPT)

    ids = tokenizer(PROMPT).input_ids
    model = fingerprint(resolve_model(str(tiny_llama_dir), tiny_llama_dir), "float32")
    chain = reusable_chain(model, "", ids, BLOCK)[:blocks]
    with redis.Redis.from_url(redis_url, decode_responses=True) as r:

        async def spilled() -> bool:  # the holder's tier has the records; the other tier none
            return all(r.hget(block_key(stack.namespace, holder, h), "tier") == "cpu" for h in chain)

        await until(spilled, f"tier {holder} to hold the prompt's {blocks} blocks", 30)
        assert not any(r.exists(block_key(stack.namespace, other, h)) for h in chain)

    async def idle() -> bool:  # as the scheduler sees them: a heartbeat after the fillers ended
        return all(
            w.load.running == 0 and w.load.waiting == 0 and w.load.free_blocks == w.total_blocks
            for w in await list_workers(stack)
        )

    # Otherwise MoR may still price the holder as busy with the fillers (sent to it directly,
    # behind the scheduler's back) and place the returning prompt on the idle other node.
    await until(idle, "both workers to report themselves idle", 30)
    before = {w.tier_node: w.dispatched for w in await list_workers(stack)}
    again = await generate(stack, PROMPT)
    assert list(again.token_ids) == list(first.token_ids)
    assert again.usage.cached_tokens == blocks * BLOCK  # loaded from the holder's tier, not recomputed
    now = {w.tier_node: w.dispatched for w in await list_workers(stack)}
    assert (now[holder] - before[holder], now[other] - before[other]) == (1, 0)

    other_tier = nodes.tier2.address if other == "node-2" else stack.tier
    async with stack.internal_channel(other_tier) as channel:
        stats = await tier_pb2_grpc.TierStub(channel).Stats(tier_pb2.StatsRequest(), timeout=10)
    assert stats.node == other
    assert sum(t.hits for t in stats.tiers) == 0  # nobody read the other node's tier
