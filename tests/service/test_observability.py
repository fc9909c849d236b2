"""Traces, metrics and logs of a real stack (`wicore up`, loopback), as an operator sees them:
spans arrive at an OTLP receiver (the protocol Jaeger speaks), /metrics is scraped over HTTP
and read with prometheus_client's own parser, logs are read from the services' output.

The stack offloads to a CPU tier from a deliberately tiny device pool (as test_hmt.py), so
that a prompt pushed out of the device comes back from the tier: the request that reloads
it must be one trace through all four services.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import openai
import pytest
from otlp_receiver import OtlpReceiver, ReceivedSpan
from prometheus_client.parser import text_string_to_metric_families
from transformers import AutoTokenizer

from wicore.kv.hashing import reusable_chain
from wicore.model_files import fingerprint, resolve_model
from wicore.v1 import inference_pb2 as pb
from wicore.v1 import inference_pb2_grpc, tier_pb2, tier_pb2_grpc

from stack import Stack, free_port, start_stack, until

BLOCK = 16
BLOCK_BYTES = 2 * 4 * BLOCK * 2 * 16 * 4  # tiny Llama: 4 layers, 2 KV heads of 16, fp32
POOL_BLOCKS = 11  # one long prompt at a time
PROMPT = 2 * "Operators watch WiCore in Jaeger and Grafana; every span names its service and tier. "
SECRET = "zebra-violin-quartz"  # a prompt word that must never reach a log
SERVICES = {"wicore-gateway", "wicore-scheduler", "wicore-worker", "wicore-tier"}
MAX_TOKENS = 12


@pytest.fixture(scope="module")
def receiver() -> Iterator[OtlpReceiver]:
    with OtlpReceiver() as r:
        yield r


@pytest.fixture(scope="module")
def http_port() -> int:
    return free_port()


@pytest.fixture(scope="module")
def stack(
    tmp_path_factory: pytest.TempPathFactory,
    tiny_llama_dir: Path,
    redis_url: str,
    receiver: OtlpReceiver,
    http_port: int,
) -> Iterator[Stack]:
    settings = {
        "worker.kv_cache_bytes": POOL_BLOCKS * BLOCK_BYTES,
        "worker.cpu_kernels": "default",
        "tier.cpu_codec": "raw",
        "tier.nvme_capacity_bytes": 0,
        "gateway.http_port": http_port,
        "observability.otlp_endpoint": receiver.endpoint,
        "observability.sample_ratio": 1.0,
        "observability.log_format": "json",
    }
    s = start_stack(
        tmp_path_factory.mktemp("observability"), str(tiny_llama_dir), redis_url, settings=settings
    )
    yield s
    assert s.stop() == 0, s.log()[-3000:]


@pytest.fixture()
async def client(stack: Stack) -> AsyncIterator[inference_pb2_grpc.InferenceStub]:
    async with grpc.aio.insecure_channel(stack.gateway) as channel:
        yield inference_pb2_grpc.InferenceStub(channel)


async def generate(
    client: inference_pb2_grpc.InferenceStub, prompt: str, traceparent: str | None = None
) -> pb.GenerateResponse:
    request = pb.GenerateRequest(
        prompt=prompt, max_tokens=MAX_TOKENS, sampling=pb.SamplingParams(temperature=0.0)
    )
    metadata = (("traceparent", traceparent),) if traceparent else None
    return await client.Generate(request, timeout=60, metadata=metadata)


def new_traceparent() -> tuple[str, str, str]:
    """A client's own trace context: (header, trace id, the client's span id)."""
    trace_id, span_id = f"{random.getrandbits(128):032x}", f"{random.getrandbits(64):016x}"
    return f"00-{trace_id}-{span_id}-01", trace_id, span_id


async def whole_trace(receiver: OtlpReceiver, trace_id: str, names: set[str]) -> list[ReceivedSpan]:
    """The trace's spans once every span named in `names` has arrived (exports are batched)."""
    await until(lambda: names <= {s.name for s in receiver.trace(trace_id)}, f"spans {sorted(names)}")
    await asyncio.sleep(1.5)  # spans ending just after those: one more export interval
    return receiver.trace(trace_id)


def ancestors(span: ReceivedSpan, by_id: dict[str, ReceivedSpan]) -> list[ReceivedSpan]:
    chain = []
    while span.parent_id in by_id:
        span = by_id[span.parent_id]
        chain.append(span)
    return chain


def one(spans: list[ReceivedSpan], name: str, service: str) -> ReceivedSpan:
    found = [s for s in spans if s.name == name and s.service == service]
    assert len(found) == 1, (name, service, [(s.name, s.service) for s in spans])
    return found[0]


async def push_out(client: inference_pb2_grpc.InferenceStub, keep: str) -> None:
    """Never-seen prompts as long as `keep`: `keep`'s cached blocks are reclaimed and spilled."""
    for _ in range(2):
        await generate(client, "".join(random.choice("abcdefgh") for _ in range(8)) + keep[8:])


async def wait_in_tier(stack: Stack, model_dir: Path, prompt: str, blocks: int) -> None:
    ids = list(AutoTokenizer.from_pretrained(model_dir)(prompt).input_ids)
    model = fingerprint(resolve_model(str(model_dir), model_dir), "float32")
    chain = reusable_chain(model, "", ids, BLOCK)[:blocks]
    async with stack.internal_channel(stack.tier) as channel:
        tier = tier_pb2_grpc.TierStub(channel)

        async def present() -> bool:
            reply = await tier.Lookup(tier_pb2.LookupRequest(block_hashes=chain), timeout=10)
            return reply.prefix_blocks == blocks

        await until(present, f"the tier to hold the prompt's {blocks} blocks")


def scrape(address: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of one service's /metrics: (name, sorted labels) -> value."""
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as reply:
        assert reply.status == 200 and reply.headers["Content-Type"].startswith("text/plain")
        text = reply.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float:
    """The sum of `name`'s samples whose labels include `labels`."""
    wanted = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and wanted <= set(ls))


async def test_a_request_reloading_its_prefix_is_one_trace_through_the_four_services(
    client: inference_pb2_grpc.InferenceStub, stack: Stack, receiver: OtlpReceiver, tiny_llama_dir: Path
) -> None:
    first = await generate(client, PROMPT)
    blocks = (first.usage.prompt_tokens - 1) // BLOCK
    await push_out(client, PROMPT)
    await wait_in_tier(stack, tiny_llama_dir, PROMPT, blocks)

    header, trace_id, client_span = new_traceparent()
    again = await generate(client, PROMPT, traceparent=header)
    assert again.usage.cached_tokens == blocks * BLOCK  # the prefix came back from the tier
    spans = await whole_trace(
        receiver, trace_id, {"/wicore.v1.Tier/GetBlocks", "worker.decode", "scheduler.route"}
    )

    assert {s.service for s in spans} == SERVICES
    by_id = {s.span_id: s for s in spans}
    roots = [s for s in spans if s.parent_id not in by_id]
    assert [(r.name, r.service, r.parent_id) for r in roots] == [
        ("/wicore.v1.Inference/Generate", "wicore-gateway", client_span)  # the client's span is its parent
    ]
    # The tier's GetBlocks server span hangs, hop by hop, from the client's request.
    get = one(spans, "/wicore.v1.Tier/GetBlocks", "wicore-tier")
    path = [(s.service, s.name) for s in ancestors(get, by_id)]
    assert path == [
        ("wicore-worker", "/wicore.v1.Tier/GetBlocks"),
        ("wicore-worker", "worker.prefix_reload"),
        ("wicore-worker", "/wicore.v1.Worker/Generate"),
        ("wicore-scheduler", "/wicore.v1.Worker/Generate"),
        ("wicore-scheduler", "/wicore.v1.Scheduler/Generate"),
        ("wicore-gateway", "/wicore.v1.Scheduler/Generate"),
        ("wicore-gateway", "/wicore.v1.Inference/Generate"),
    ]
    assert get.attributes["wicore.tier.cpu_blocks"] == blocks
    reload = one(spans, "worker.prefix_reload", "wicore-worker")
    assert reload.attributes["wicore.reload.cpu_blocks"] == blocks
    assert reload.attributes["wicore.reload.cpu_bytes"] == blocks * BLOCK_BYTES  # raw codec: as on device
    lookup = one(spans, "/wicore.v1.Tier/Lookup", "wicore-tier")
    assert by_id[lookup.parent_id].parent_id == reload.span_id

    worker_rpc = one(spans, "/wicore.v1.Worker/Generate", "wicore-worker")
    queue, prefill, decode = (
        one(spans, f"worker.{n}", "wicore-worker") for n in ("queue", "prefill", "decode")
    )
    assert queue.parent_id == prefill.parent_id == decode.parent_id == worker_rpc.span_id
    assert queue.end_ns <= prefill.start_ns + 1000 and prefill.end_ns <= decode.start_ns + 1000
    assert prefill.attributes["wicore.cached_tokens"] == blocks * BLOCK
    assert decode.attributes["wicore.completion_tokens"] == MAX_TOKENS

    scheduler_rpc = one(spans, "/wicore.v1.Scheduler/Generate", "wicore-scheduler")
    route = one(spans, "scheduler.route", "wicore-scheduler")
    assert route.parent_id == scheduler_rpc.span_id
    assert route.attributes["wicore.routing.policy"] == "mor"
    assert "wicore.routing.cost.total" in route.attributes
    prefix = one(spans, "scheduler.prefix_lookup", "wicore-scheduler")
    assert prefix.attributes["wicore.prefix.cpu_blocks"] == blocks  # Redis knew the tier held them
    assert one(spans, "/wicore.v1.Inference/Generate", "wicore-gateway").attributes[
        "wicore.completion_tokens"
    ] == (MAX_TOKENS)


async def test_an_http_request_continues_the_clients_traceparent(
    stack: Stack, receiver: OtlpReceiver, http_port: int
) -> None:
    header, trace_id, client_span = new_traceparent()
    api = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{http_port}/v1", api_key="unused", max_retries=0)
    async with api:
        reply = await api.chat.completions.create(
            model="tiny-llama",
            messages=[{"role": "user", "content": "Hello there"}],
            max_tokens=4,
            extra_headers={"traceparent": header},
        )
    assert reply.choices[0].finish_reason in ("stop", "length")
    spans = await whole_trace(receiver, trace_id, {"POST /v1/chat/completions", "worker.decode"})
    assert {s.service for s in spans} >= {"wicore-gateway", "wicore-scheduler", "wicore-worker"}
    http = one(spans, "POST /v1/chat/completions", "wicore-gateway")
    assert http.parent_id == client_span
    assert http.attributes["http.response.status_code"] == 200
    by_id = {s.span_id: s for s in spans}
    decode = one(spans, "worker.decode", "wicore-worker")
    assert ancestors(decode, by_id)[-1] == http


async def test_metrics_of_every_service_move_with_traffic(
    client: inference_pb2_grpc.InferenceStub, stack: Stack
) -> None:
    before = {name: scrape(address) for name, address in stack.metrics.items()}
    requests = 3
    messages = []  # per request, the streamed messages that carry tokens
    for i in range(requests):
        request = pb.GenerateRequest(
            prompt=f"{i} {PROMPT}", max_tokens=MAX_TOKENS, sampling=pb.SamplingParams(temperature=0.0)
        )
        messages.append(len([m async for m in client.GenerateStream(request, timeout=60) if m.token_ids]))
    await asyncio.sleep(0.5)  # the worker's stats snapshot follows its last step
    after = {name: scrape(address) for name, address in stack.metrics.items()}

    def moved(service: str, name: str, **labels: str) -> float:
        return value(after[service], name, **labels) - value(before[service], name, **labels)

    assert moved("gateway", "wicore:request_success_total", finished_reason="length") == requests
    assert moved("gateway", "wicore:generation_tokens_total") == requests * MAX_TOKENS
    assert moved("gateway", "wicore:time_to_first_token_seconds_count") == requests
    # One per message after a request's first: a token each, unless the worker merged the tokens
    # waiting for a stream that fell behind it (async_engine.py).
    assert moved("gateway", "wicore:inter_token_latency_seconds_count") == sum(n - 1 for n in messages)
    assert moved("gateway", "wicore:e2e_request_latency_seconds_count") == requests
    assert moved("gateway", "wicore:prompt_tokens_total") > requests * BLOCK
    assert moved("scheduler", "wicore:routing_decisions_total", policy="mor") == requests
    assert moved("scheduler", "wicore:scheduler_queue_time_seconds_count") == requests
    assert value(after["scheduler"], "wicore:workers", device="cpu") == 1
    assert moved("worker-0", "wicore:prefix_cache_queries_total") == moved(
        "gateway", "wicore:prompt_tokens_total"
    )
    assert moved("worker-0", "wicore:request_prefill_time_seconds_count") == requests
    assert moved("worker-0", "wicore:request_decode_time_seconds_count") == requests
    assert value(after["worker-0"], "wicore:num_requests_running") == 0
    for name in stack.metrics:
        assert value(after[name], "process_resident_memory_bytes") > 0
        assert value(after[name], "wicore:trace_spans_exported_total") > 0
        assert value(after[name], "wicore:trace_spans_dropped_total") == 0


async def test_gauges_show_a_request_while_it_runs(
    client: inference_pb2_grpc.InferenceStub, stack: Stack
) -> None:
    request = pb.GenerateRequest(prompt="gauges", max_tokens=150, ignore_eos=True)
    stream = client.GenerateStream(request, timeout=60)
    async for _ in stream:  # the first token is out: the request runs, its KV holds blocks
        during = {name: scrape(stack.metrics[name]) for name in ("gateway", "worker-0")}
        break
    stream.cancel()
    assert value(during["gateway"], "wicore:gateway_requests_in_flight") == 1
    assert value(during["worker-0"], "wicore:num_requests_running") == 1
    assert value(during["worker-0"], "wicore:kv_cache_usage_perc") > 0

    async def settled() -> bool:  # the cancel reached the worker: nothing runs, its blocks are free
        samples = scrape(stack.metrics["worker-0"])
        return (
            value(samples, "wicore:num_requests_running") == 0
            and value(samples, "wicore:kv_cache_usage_perc") == 0
        )

    await until(settled, "the cancelled request to leave the worker")
    failed = value(scrape(stack.metrics["gateway"]), "wicore:request_failure_total", code="CANCELLED")
    assert failed >= 1


async def test_offload_and_tier_metrics_count_spills_and_reloads(
    client: inference_pb2_grpc.InferenceStub, stack: Stack, tiny_llama_dir: Path
) -> None:
    prompt = "Tier metrics: " + PROMPT
    before = {name: scrape(address) for name, address in stack.metrics.items()}
    first = await generate(client, prompt)
    blocks = (first.usage.prompt_tokens - 1) // BLOCK
    await push_out(client, prompt)
    await wait_in_tier(stack, tiny_llama_dir, prompt, blocks)
    await generate(client, prompt)
    after = {name: scrape(address) for name, address in stack.metrics.items()}

    def moved(service: str, name: str, **labels: str) -> float:
        return value(after[service], name, **labels) - value(before[service], name, **labels)

    assert moved("worker-0", "wicore:kv_blocks_spilled_total") >= blocks
    assert moved("worker-0", "wicore:kv_blocks_reloaded_total", source="cpu") >= blocks
    assert moved("tier", "wicore:tier_hits_total", tier="cpu") >= blocks
    assert moved("tier", "wicore:tier_bytes_in_total", tier="cpu") >= blocks * BLOCK_BYTES
    assert value(after["tier"], "wicore:tier_blocks", tier="cpu", codec="raw") >= blocks
    assert value(after["tier"], "wicore:redis_up") == 1
    assert moved("worker-0", "wicore:prefix_cache_hits_total") >= blocks * BLOCK


async def test_json_logs_lead_to_the_trace_and_never_carry_the_prompt(
    client: inference_pb2_grpc.InferenceStub, stack: Stack, receiver: OtlpReceiver
) -> None:
    header, trace_id, _ = new_traceparent()
    reply = await generate(client, f"Please remember {SECRET} for me", traceparent=header)
    await until(lambda: reply.request_id in stack.log(), "the gateway's line about the request")
    lines = [json.loads(line) for line in stack.log().splitlines() if line.startswith("{")]
    assert {line["service"] for line in lines} == {"gateway", "scheduler", "worker", "tier"}
    assert all({"time", "level", "service", "logger", "message"} <= set(line) for line in lines)
    mine = [line for line in lines if line.get("request_id") == reply.request_id]
    assert mine and all(line["trace_id"] == trace_id and len(line["span_id"]) == 16 for line in mine)
    assert SECRET not in stack.log()


def test_a_dead_collector_costs_requests_nothing(
    tmp_path: Path, tiny_llama_dir: Path, redis_url: str
) -> None:
    """Spans for a collector nobody listens on are counted as failed; requests do not wait."""
    nobody = f"127.0.0.1:{free_port()}"
    stack = start_stack(
        tmp_path, str(tiny_llama_dir), redis_url, settings={"observability.otlp_endpoint": nobody}
    )

    async def requests() -> None:
        async with grpc.aio.insecure_channel(stack.gateway) as channel:
            client = inference_pb2_grpc.InferenceStub(channel)
            for i in range(5):
                started = time.monotonic()
                await generate(client, f"{i} nobody collects these spans")
                assert time.monotonic() - started < 2.0  # an export attempt lasts up to 5 s

    try:
        asyncio.run(requests())

        def failed() -> bool:
            return value(scrape(stack.metrics["gateway"]), "wicore:trace_spans_failed_total") > 0

        asyncio.run(until(failed, "the gateway to count spans it could not export", timeout_s=30))
    finally:
        assert stack.stop() == 0, stack.log()[-3000:]
