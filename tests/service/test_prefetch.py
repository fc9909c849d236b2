"""The scheduler prefetches: a queued request whose prefix sits on NVMe has it promoted to CPU RAM
before any worker asks. Real tier process, real Redis, a real scheduler over gRPC; the worker is
scripted (it never touches the tier), so only the scheduler can have moved the blocks."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import redis
from transformers import AutoTokenizer

from wicore.config import load_config
from wicore.kv.hashing import reusable_chain
from wicore.redis_keys import block_key
from wicore.scheduler.app import build_servicer
from wicore.server import ServiceServer
from wicore.v1 import inference_pb2 as pb
from wicore.v1 import scheduler_pb2, scheduler_pb2_grpc, tier_pb2, tier_pb2_grpc, worker_pb2, worker_pb2_grpc

from stack import free_port, until
from tier_process import BLOCK_BYTES, block_chunks, delete_namespace, raw_of, start_tier, stop, wait_up

FINGERPRINT = "prefetch-test-model"
PROMPT = "Paged attention keeps the KV cache in blocks; the tier keeps them on NVMe until asked. " * 2


class OneTokenWorker(worker_pb2_grpc.WorkerServicer):
    def __init__(self) -> None:
        self.received: list[worker_pb2.TokenizedRequest] = []

    async def Generate(
        self, request: worker_pb2.TokenizedRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.GenerateStreamResponse]:
        self.received.append(request)
        yield pb.GenerateStreamResponse(request_id=request.request.request_id, token_ids=[1], text="a")
        yield pb.GenerateStreamResponse(
            request_id=request.request.request_id, finish_reason=pb.FINISH_REASON_LENGTH
        )


async def test_a_queued_requests_nvme_prefix_is_promoted_by_the_scheduler(
    tmp_path: Path, redis_url: str, tiny_llama_dir: Path
) -> None:
    namespace = f"wicore-test-{uuid.uuid4().hex}"
    ids = list(AutoTokenizer.from_pretrained(tiny_llama_dir)(PROMPT).input_ids)
    chain = reusable_chain(FINGERPRINT, "", ids, 16)
    assert len(chain) >= 3
    capacity = (len(chain) + 3) * BLOCK_BYTES  # the chain fits, and the cleanup takes fillers first
    tier = start_tier(
        tmp_path, redis_url, namespace, cpu_capacity_bytes=capacity, cpu_codec="raw", nvme_codec="raw"
    )
    servers: list[ServiceServer] = []
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    try:
        await wait_up(tier)
        fillers = [uuid.uuid4().hex for _ in range(len(chain) + 3)]  # put after the chain: it is demoted
        async with grpc.aio.insecure_channel(tier.address) as channel:
            tier_stub = tier_pb2_grpc.TierStub(channel)
            chunks = [c for h in [*chain, *fillers] for c in block_chunks(h, raw_of(h))]
            assert (await tier_stub.PutBlocks(iter(chunks), timeout=30)).stored == len(chain) + len(fillers)
            assert {client.hget(block_key(namespace, "local", h), "tier") for h in chain} == {"nvme"}

            port = free_port()
            config = load_config(None, {}, {
                "scheduler.port": port, "scheduler.heartbeat_interval_s": 0.1, "redis.url": redis_url,
                "redis.namespace": namespace,
                "state_dir": str(tmp_path / "state"),
            })  # fmt: skip
            servicer = build_servicer(config)
            scheduler = ServiceServer("scheduler", "127.0.0.1", port)
            scheduler.add(scheduler_pb2_grpc.add_SchedulerServicer_to_server, servicer, "wicore.v1.Scheduler")
            worker_port = free_port()
            worker = ServiceServer("worker", "127.0.0.1", worker_port)
            scripted = OneTokenWorker()
            worker.add(worker_pb2_grpc.add_WorkerServicer_to_server, scripted, "wicore.v1.Worker")
            for server in (scheduler, worker):
                await server.start()
                servers.append(server)
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as sched_channel:
                stub = scheduler_pb2_grpc.SchedulerStub(sched_channel)
                await stub.RegisterWorker(scheduler_pb2.RegisterWorkerRequest(
                    worker_id="w", address=f"127.0.0.1:{worker_port}", device="cpu", model="m",
                    max_context=4096, total_blocks=1000, block_size=16, max_batch_size=4,
                    fingerprint=FINGERPRINT, tier_address=tier.address, tier_node="local",
                ))  # fmt: skip
                request = worker_pb2.TokenizedRequest(
                    request=pb.GenerateRequest(max_tokens=1), prompt_token_ids=ids
                )
                tokens = [t async for m in stub.Generate(request, timeout=30) for t in m.token_ids]
                assert tokens == [1]
            # The scheduler hashed the prompt once and handed the hashes on: the worker hashes none.
            (received,) = scripted.received
            assert list(received.block_hashes) == chain
            assert (received.fingerprint, received.block_size) == (FINGERPRINT, 16)

            async def promoted() -> bool:  # the prefetch runs in the background of the request
                lookup = await tier_stub.Lookup(tier_pb2.LookupRequest(block_hashes=chain), timeout=10)
                return list(lookup.tiers) == [tier_pb2.STORAGE_TIER_CPU] * len(chain)

            await until(promoted, "the scheduler's prefetch to promote the chain", 10.0)
            stats = await tier_stub.Stats(tier_pb2.StatsRequest(), timeout=10)
            assert stats.blocks_promoted >= len(chain)
            assert stats.tiers[0].hits == 0  # nobody read them: promoted, not served
        await servicer.close()
        await servicer.prefixes.close()
    finally:
        for server in servers:
            with contextlib.suppress(Exception):
                await server.server.stop(0)
        stop(tier)
        delete_namespace(client, namespace)
        client.close()
