"""API keys, tenants and internal authentication on a whole stack (`wicore up`): missing,
wrong and revoked keys are refused; tenants never share cached KV, neither on the device
nor after a spill to the tier; a tenant's own limits; the internal services refuse callers
without the internal token."""

from __future__ import annotations

import os
import random
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc
from transformers import AutoTokenizer

from wicore.gateway.auth import Tenant, fold_cache_salt, key_digest, new_key
from wicore.kv.hashing import reusable_chain
from wicore.model_files import fingerprint, resolve_model
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

from stack import Stack, start_stack, until

BLOCK = 16
BLOCK_BYTES = 2 * 4 * BLOCK * 2 * 16 * 4  # tiny Llama: 4 layers, 2 KV heads of 16, fp32
POOL_BLOCKS = 48  # small enough to push a prefix out with a few prompts, big enough for a long request
ALICE, BOB, CAROL, LIMITED = (new_key() for _ in range(4))
LIMITS = {"max_concurrent_requests": 1, "max_tokens": 700}


def keys_entry(key: str, tenant: str) -> dict[str, str]:
    return {"sha256": key_digest(key), "tenant": tenant}


def write_keys_file(path: Path, entries: list[dict[str, str]]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(yaml.safe_dump({"api_keys": entries}))
    os.replace(tmp, path)  # atomically, as the README advises


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, tiny_llama_dir: Path, redis_url: str) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("auth")
    write_keys_file(tmp / "keys.yaml", [keys_entry(CAROL, "carol")])
    settings = {
        "gateway.api_keys": [
            keys_entry(ALICE, "alice"),
            keys_entry(BOB, "bob"),
            keys_entry(LIMITED, "limited"),
        ],
        "gateway.tenants": {"limited": LIMITS},
        "gateway.api_keys_file": str(tmp / "keys.yaml"),
        "worker.kv_cache_bytes": POOL_BLOCKS * BLOCK_BYTES,
        "worker.cpu_kernels": "default",
        "tier.cpu_codec": "raw",
        "tier.nvme_capacity_bytes": 0,
    }
    s = start_stack(tmp, str(tiny_llama_dir), redis_url, settings=settings)
    yield s
    assert s.stop() == 0, s.log()[-3000:]


@pytest.fixture()
async def client(stack: Stack) -> AsyncIterator[inference_pb2_grpc.InferenceStub]:
    async with grpc.aio.insecure_channel(stack.gateway) as channel:
        yield inference_pb2_grpc.InferenceStub(channel)


def bearer(key: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {key}"),)


async def generate(
    client: inference_pb2_grpc.InferenceStub, key: str, prompt: str, max_tokens: int = 4
) -> pb.GenerateResponse:
    request = pb.GenerateRequest(
        prompt=prompt, max_tokens=max_tokens, sampling=pb.SamplingParams(temperature=0)
    )
    return await client.Generate(request, metadata=bearer(key), timeout=60)


async def refused(call: object) -> grpc.StatusCode:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call  # type: ignore[misc]
    return err.value.code()


def long_prompt() -> str:
    """About 160 tokens (ten full blocks), never seen before."""
    head = "".join(random.choice("abcdefgh") for _ in range(8))
    return head + 3 * " Paged attention keeps the KV cache in blocks of sixteen tokens; WiCore spills them."


async def test_missing_wrong_and_revoked_keys_are_refused(
    client: inference_pb2_grpc.InferenceStub, stack: Stack
) -> None:
    request = pb.GenerateRequest(prompt="hi", max_tokens=2)
    unauthenticated = grpc.StatusCode.UNAUTHENTICATED
    assert await refused(client.Generate(request, timeout=30)) == unauthenticated
    assert (
        await refused(client.Generate(request, metadata=bearer(ALICE + "x"), timeout=30)) == unauthenticated
    )
    assert (
        await refused(client.Generate(request, metadata=bearer(key_digest(ALICE)), timeout=30))
        == unauthenticated
    )
    assert await refused(client.ListModels(pb.ListModelsRequest(), timeout=30)) == unauthenticated
    assert await refused(client.Tokenize(pb.TokenizeRequest(text="x"), timeout=30)) == unauthenticated
    assert (await client.Generate(request, metadata=bearer(ALICE), timeout=30)).usage.completion_tokens == 2
    assert (await client.Generate(request, metadata=bearer(CAROL), timeout=30)).usage.completion_tokens == 2

    # Revoked: deleted from the keys file, no restart; a key added there works as soon.
    dave = new_key()
    write_keys_file(stack.state_dir.parent / "keys.yaml", [keys_entry(dave, "dave")])

    async def carol_refused() -> bool:
        try:
            await client.Generate(request, metadata=bearer(CAROL), timeout=30)
        except grpc.aio.AioRpcError as exc:
            return exc.code() == unauthenticated
        return False

    await until(carol_refused, "the gateway to drop the revoked key", timeout_s=10)
    assert (await client.Generate(request, metadata=bearer(dave), timeout=30)).usage.completion_tokens == 2
    assert (await client.Generate(request, metadata=bearer(ALICE), timeout=30)).usage.completion_tokens == 2


async def test_tenants_never_reuse_each_others_cached_prefixes(
    client: inference_pb2_grpc.InferenceStub,
) -> None:
    prompt = long_prompt()
    first = await generate(client, ALICE, prompt)
    assert first.usage.cached_tokens == 0 and first.usage.prompt_tokens > 8 * BLOCK
    assert (await generate(client, BOB, prompt)).usage.cached_tokens == 0  # the same prompt, on the device
    alice = await generate(client, ALICE, prompt)
    bob = await generate(client, BOB, prompt)
    assert alice.usage.cached_tokens == bob.usage.cached_tokens >= 8 * BLOCK  # each from its own blocks
    assert alice.text == bob.text == first.text


async def test_tenants_never_reuse_each_others_spilled_prefixes(
    client: inference_pb2_grpc.InferenceStub, stack: Stack, tiny_llama_dir: Path
) -> None:
    prompt = long_prompt()
    first = await generate(client, ALICE, prompt)
    assert first.usage.cached_tokens == 0
    async with stack.internal_channel(stack.tier) as channel:
        tier = tier_pb2_grpc.TierStub(channel)
        chain = alices_chain(tiny_llama_dir, prompt)
        for _ in range(12):  # new prompts until Alice's blocks were pushed out of the device, to the tier
            await generate(client, ALICE, long_prompt())
            lookup = await tier.Lookup(tier_pb2.LookupRequest(block_hashes=chain), timeout=10)
            if lookup.prefix_blocks == len(chain):
                break
        assert lookup.prefix_blocks == len(chain) >= 8
    bob = await generate(client, BOB, prompt)
    assert bob.usage.cached_tokens == 0  # Alice's blocks are in the tier: not Bob's
    alice = await generate(client, ALICE, prompt)
    assert alice.usage.cached_tokens == len(chain) * BLOCK  # hers, loaded back from the tier
    assert alice.text == bob.text == first.text


def alices_chain(model_dir: Path, prompt: str) -> list[str]:
    """The prompt's block hashes as the worker keys them for tenant alice."""
    ids = list(AutoTokenizer.from_pretrained(model_dir)(prompt).input_ids)
    model = fingerprint(resolve_model(str(model_dir), model_dir), "float32")
    return list(reusable_chain(model, fold_cache_salt(Tenant("alice"), ""), ids, BLOCK))


async def test_a_tenants_own_limits(client: inference_pb2_grpc.InferenceStub) -> None:
    too_many = pb.GenerateRequest(prompt="hi", max_tokens=LIMITS["max_tokens"] + 1)
    call = client.Generate(too_many, metadata=bearer(LIMITED), timeout=30)
    assert await refused(call) == grpc.StatusCode.INVALID_ARGUMENT
    assert (await generate(client, ALICE, "hi", max_tokens=LIMITS["max_tokens"] + 1)).usage.completion_tokens

    long = pb.GenerateRequest(prompt="Count:", max_tokens=600, ignore_eos=True)
    running = client.GenerateStream(long, metadata=bearer(LIMITED), timeout=60)
    try:
        await running.read()  # admitted, and streaming for a while yet
        second = client.Generate(pb.GenerateRequest(prompt="hi", max_tokens=2), metadata=bearer(LIMITED))
        assert await refused(second) == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert (
            await generate(client, ALICE, "hi", max_tokens=2)
        ).usage.completion_tokens == 2  # others go on
    finally:
        running.cancel()

    async def admitted_again() -> bool:
        try:
            await generate(client, LIMITED, "hi", max_tokens=2)
        except grpc.aio.AioRpcError:
            return False
        return True

    await until(admitted_again, "the limited tenant's slot to be freed", timeout_s=10)


async def test_internal_services_refuse_callers_without_the_token(stack: Stack) -> None:
    calls = {
        stack.scheduler: lambda c: scheduler_pb2_grpc.SchedulerStub(c).ListWorkers(
            scheduler_pb2.ListWorkersRequest(), timeout=10
        ),
        stack.tier: lambda c: tier_pb2_grpc.TierStub(c).Stats(tier_pb2.StatsRequest(), timeout=10),
        stack.workers[0]: lambda c: _drain(
            worker_pb2_grpc.WorkerStub(c).Generate(
                worker_pb2.TokenizedRequest(
                    request=pb.GenerateRequest(max_tokens=1), prompt_token_ids=[1, 2]
                ),
                timeout=10,
            )
        ),
    }
    for address, call in calls.items():
        async with grpc.aio.insecure_channel(address) as channel:
            assert await refused(call(channel)) == grpc.StatusCode.UNAUTHENTICATED, address
            health = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
            assert health.status == health_pb2.HealthCheckResponse.SERVING  # probes stay open
        async with stack.internal_channel(address) as channel:
            await call(channel)  # the stack's own token opens every one


async def _drain(call: AsyncIterator[object]) -> None:
    async for _ in call:
        pass


def test_the_token_file_is_private(stack: Stack) -> None:
    token_file = stack.state_dir / "internal-token"
    assert token_file.stat().st_mode & 0o777 == 0o600
    assert (stack.state_dir / "config.yaml").stat().st_mode & 0o777 == 0o600
    assert stack.auth.token not in (stack.state_dir / "config.yaml").read_text()
