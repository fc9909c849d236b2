"""Worker process: load the model, serve `wicore.v1.Worker`, register with the
scheduler and keep heartbeating (publishing its prefix cache to Redis for
routing at each beat) until SIGTERM."""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from dataclasses import dataclass, fields, replace
from typing import Any

import grpc
import torch

from wicore.channels import InternalAuth, internal_channel, internal_server
from wicore.config import (
    Config,
    CpuKernels,
    CudaOptimization,
    GpuPoolConfig,
    MixedPrecision,
    ModelImpl,
    SpecMethod,
    TierLoads,
    WeightQuant,
    WorkerDtype,
    is_device,
)
from wicore.errors import ConfigError
from wicore.kv.client import TierClient
from wicore.kv.codecs import DTYPES
from wicore.metrics import start_metrics
from wicore.model_files import fingerprint, resolve_model
from wicore.v1 import scheduler_pb2, scheduler_pb2_grpc, worker_pb2_grpc
from wicore.worker.async_engine import AsyncEngine
from wicore.worker.checkpoints import load_causal_lm
from wicore.worker.convert import ModelDefaults
from wicore.worker.costs import CostMeter
from wicore.worker.cpu_kernels import use_cpu_linears, use_int8_linears
from wicore.worker.decoder import Decoder, fuse_projections
from wicore.worker.draft import DraftProposer
from wicore.worker.kv_budget import cuda_memory, gpu_kv_blocks
from wicore.worker.metrics import WorkerMetrics
from wicore.worker.model_runner import check_supported, kv_layout
from wicore.worker.offload import KvOffloader
from wicore.worker.paged_attention import KVPool
from wicore.worker.paged_engine import EngineConfig, PagedEngine
from wicore.worker.residency import ResidencyPublisher
from wicore.worker.servicer import WorkerServicer
from wicore.worker.speculative import NgramProposer, Proposer, Speculator
from wicore.worker.threads import EngineThread

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class LoadedModel:
    model_id: str
    model: Any
    tokenizer: Any
    fingerprint: str


def load_model(config: Config) -> LoadedModel:
    from transformers import AutoTokenizer

    wc = config.worker
    device = torch_device(wc.device)
    source = resolve_model(wc.model, config.cache_path, wc.model_id)
    if wc.num_threads < 0:
        raise ConfigError(f"worker.num_threads: must be >= 0 (0: torch's default), got {wc.num_threads}")
    if wc.num_threads and wc.device == "cpu":
        torch.set_num_threads(wc.num_threads)
    apply_gpu_config(config, device)
    dtype = model_dtype(config, device)
    started = time.monotonic()
    tokenizer = AutoTokenizer.from_pretrained(source.path)
    model = load_causal_lm(source.path, DTYPES[dtype])  # a multimodal Gemma 3: its text model
    check_supported(model)
    model = model.to(device).eval()
    kv_identity = dtype.value
    fast_linears = device.type == "cpu" and (
        wc.weight_quant == WeightQuant.INT8 or wc.cpu_kernels != CpuKernels.DEFAULT
    )
    if fast_linears and wc.model_impl is ModelImpl.AUTO and Decoder.supports(model):
        fuse_projections(model)  # one q/k/v and one gate/up multiply per layer (decoder.py)
    if wc.weight_quant == WeightQuant.INT8:
        if device.type != "cpu":
            raise ConfigError("worker.weight_quant: int8 runs on CPU workers only; use none on a GPU")
        use_int8_linears(model)
        kv_identity += "+int8"  # other weights, other KV: never share cached blocks with fp weights
    elif wc.cpu_kernels != CpuKernels.DEFAULT and device.type == "cpu":
        table = use_cpu_linears(
            model, measure=wc.cpu_kernels == CpuKernels.AUTO, kernel_dir=str(config.cache_path / "kernels")
        )
        log.info("linear layers: %s (worker.cpu_kernels: %s)", table.describe(), wc.cpu_kernels)
    log.info("loaded %s from %s in %.1f s", source.model_id, source.path, time.monotonic() - started)
    return LoadedModel(source.model_id, model, tokenizer, fingerprint(source, kv_identity))


MIXED_PRECISION_DTYPES = {
    MixedPrecision.FP32: WorkerDtype.FLOAT32,
    MixedPrecision.FP16: WorkerDtype.FLOAT16,
    MixedPrecision.BF16: WorkerDtype.BFLOAT16,
}


def model_dtype(config: Config, device: torch.device) -> WorkerDtype:
    """worker.dtype; `auto`: float32 on CPU, gpu_config.cuda_optimization.mixed_precision on a GPU."""
    dtype = WorkerDtype(config.worker.dtype)
    if dtype is not WorkerDtype.AUTO:
        return dtype
    if device.type != "cuda":
        return WorkerDtype.FLOAT32
    return MIXED_PRECISION_DTYPES[MixedPrecision(config.gpu_config.cuda_optimization.mixed_precision)]


def ignored_gpu_settings(config: Config, device: torch.device) -> list[str]:
    """Why each of the performance guide's settings that has no effect on this worker has none;
    only settings changed from their defaults, so that the default config says nothing."""
    gpu, pool, default_pool = config.gpu_config, config.gpu_pool_config, GpuPoolConfig()
    reasons = []
    if gpu.enable_p2p:
        reasons.append(
            "gpu_config.enable_p2p: has no effect here: each worker owns one device, and KV blocks "
            "move between workers through the tier service, not peer to peer"
        )
    changed = [f.name for f in fields(pool) if getattr(pool, f.name) != getattr(default_pool, f.name)]
    if changed:
        reasons.append(
            f"gpu_pool_config ({', '.join(changed)}): has no effect here: each worker preallocates its "
            "KV pool once, whole (on a GPU what gpu_config.gpu_memory_utilization leaves, at most "
            "gpu_config.memory_limit_per_gpu GiB if set; worker.kv_cache_bytes on CPU), as equal blocks "
            "of worker.block_size tokens, so it never grows, is not aligned by hand and does not fragment"
        )
    precision = gpu.cuda_optimization.mixed_precision
    changed = precision != CudaOptimization().mixed_precision
    if device.type == "cuda" and changed and config.worker.dtype != WorkerDtype.AUTO:
        reasons.append(
            f"gpu_config.cuda_optimization.mixed_precision: {precision} has no effect: worker.dtype is "
            f"set ({config.worker.dtype}); worker.dtype: auto uses it"
        )
    return reasons


def apply_gpu_config(config: Config, device: torch.device) -> None:
    """The guide's CUDA switches on a CUDA device (cuDNN on or off; TF32 tensor cores for float32
    matmuls and convolutions when enable_tensor_cores, torch's defaults otherwise); one warning
    for each changed setting that has no effect here."""
    for reason in ignored_gpu_settings(config, device):
        log.warning("%s", reason)
    if device.type == "cuda":
        cuda = config.gpu_config.cuda_optimization
        torch.backends.cudnn.enabled = cuda.enable_cudnn
        if cuda.enable_tensor_cores:
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True


def engine_config(config: Config, model: Any, draft: bool = False) -> EngineConfig:
    """Sizes the KV pool: worker.kv_cache_bytes on CPU; on a GPU what gpu_memory_utilization of the
    device leaves after the loaded weights and one step's activations (kv_budget.py). A draft
    model's pool (`draft`): worker.speculative.draft_kv_cache_bytes on any device."""
    wc = config.worker
    layers, kv_heads, head_dim = kv_layout(model)
    per_block = KVPool.bytes_per_block(layers, wc.block_size, kv_heads, head_dim, model.dtype)
    device = next(model.parameters()).device
    if device.type == "cuda" and not draft:
        num_blocks = gpu_kv_blocks(config, model, per_block, cuda_memory(device))
    else:
        field, size = (
            ("worker.speculative.draft_kv_cache_bytes", wc.speculative.draft_kv_cache_bytes)
            if draft
            else ("worker.kv_cache_bytes", wc.kv_cache_bytes)
        )
        num_blocks = size // per_block
        if num_blocks < 1:
            raise ConfigError(f"{field}: {size} bytes hold no block of {per_block} bytes")
    return EngineConfig(
        num_blocks=num_blocks,
        block_size=wc.block_size,
        max_running=wc.max_batch_size,
        max_num_batched_tokens=wc.max_num_batched_tokens,
        attention_sample_every=wc.attention_sample_every,
        attention_backend=wc.attention_backend,
        model_impl=wc.model_impl,
        kernel_dir=str(config.cache_path / "kernels"),
    )


def make_speculator(config: Config, target: LoadedModel) -> Speculator | None:
    """worker.speculative: None when off; with `draft`, loads the draft model (same device,
    kernels and dtype as the target, its own KV pool of draft_kv_cache_bytes)."""
    spec = config.worker.speculative
    proposer: Proposer
    if spec.method is SpecMethod.OFF:
        return None
    if spec.method is SpecMethod.NGRAM:
        proposer = NgramProposer(spec.ngram_min, spec.ngram_max)
    else:
        draft = load_model(
            replace(config, worker=replace(config.worker, model=spec.draft_model, model_id=""))
        )
        if draft.tokenizer.get_vocab() != target.tokenizer.get_vocab():
            raise ConfigError(
                f"worker.speculative.draft_model: {spec.draft_model} has another tokenizer than the "
                "target model; a draft must share its vocabulary"
            )
        draft_config = replace(engine_config(config, draft.model, draft=True), attention_sample_every=0)
        proposer = DraftProposer(
            PagedEngine(draft.model, draft_config, draft.fingerprint),
            draft_vocab=draft.model.get_input_embeddings().num_embeddings,
            target_vocab=target.model.get_input_embeddings().num_embeddings,
        )
    return Speculator(spec, proposer)


def torch_device(device: str) -> torch.device:
    """`cpu` or `gpu:N` (the seed's names) -> a torch device."""
    if not is_device(device):  # the config allows more: lists and `auto` are `wicore up`'s
        raise ConfigError(f"worker.device: a worker runs on one device, 'cpu' or 'gpu:N'; got {device!r}")
    return torch.device("cpu") if device == "cpu" else torch.device("cuda", int(device[4:]))


class Registration:
    """Registers with the scheduler and heartbeats; re-registers when forgotten."""

    def __init__(self, config: Config, request: scheduler_pb2.RegisterWorkerRequest, engine: AsyncEngine):
        self.address = f"{config.scheduler.host}:{config.scheduler.port}"
        self.auth = InternalAuth.load(config.internal)
        self.request = request
        self.engine = engine
        self.interval = config.scheduler.heartbeat_interval_s
        self.timeout_s = config.scheduler.worker_timeout_s  # after this the scheduler drops us
        self.residency = ResidencyPublisher(
            config.redis,
            request.worker_id,
            ttl_s=max(10.0, 3 * config.scheduler.worker_timeout_s),
        )
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        # Two loops: routing data (residency) may wait on the engine thread or Redis;
        # liveness (heartbeats) must never wait behind it.
        self._tasks = [asyncio.create_task(self._run()), asyncio.create_task(self._publish_loop())]

    def _load(self) -> scheduler_pb2.WorkerLoad:
        stats = self.engine.stats()
        load = scheduler_pb2.WorkerLoad(
            running=stats.running,
            waiting=stats.waiting,
            free_blocks=stats.free_blocks,
            spec_drafts=stats.spec_drafts,
            spec_proposed_tokens=stats.spec_proposed,
            spec_accepted_tokens=stats.spec_accepted,
            prefill_tokens_per_s=self.engine.costs.prefill_tokens_per_s,
        )
        load.load_s_per_block.update({tier.value: s for tier, s in self.engine.costs.load_seconds().items()})
        offload = self.engine.offloader.stats if self.engine.offloader is not None else None
        if offload is not None:
            load.loaded_blocks.update({tier.value: n for tier, n in offload.loaded.items()})
            load.loaded_blocks["pending"] = offload.loaded_pending
            load.spilled_blocks = offload.spilled
            load.spill_failed_blocks = offload.spill_failed
        return load

    async def _run(self) -> None:
        """Registers, then heartbeats. A worker the scheduler dropped (it says it does not
        know it, or has not heard from it for `worker_timeout_s`) has had its streams
        resumed on other workers: its own copies are orphans, and are aborted."""
        registered = False
        loop = asyncio.get_running_loop()
        last_heard = loop.time()
        async with internal_channel(self.address, self.auth) as channel:
            stub = scheduler_pb2_grpc.SchedulerStub(channel)
            while True:
                try:
                    if not registered:
                        self.request.load.CopyFrom(self._load())
                        reply = await stub.RegisterWorker(self.request, timeout=2.0)
                        self.interval = reply.heartbeat_interval_s or self.interval
                        registered = True
                        log.info("registered with the scheduler at %s", self.address)
                    else:
                        beat = scheduler_pb2.HeartbeatRequest(
                            worker_id=self.request.worker_id,
                            load=self._load(),
                            tier_node=self.request.tier_node,
                        )
                        registered = (await stub.Heartbeat(beat, timeout=2.0)).known
                        if not registered:
                            self.engine.abort_all("the scheduler dropped this worker")
                    last_heard = loop.time()
                except grpc.aio.AioRpcError as exc:
                    if registered:
                        log.warning("scheduler unreachable (%s); will re-register", exc.code().name)
                    registered = False
                    if loop.time() - last_heard > self.timeout_s:
                        self.engine.abort_all(f"the scheduler has not answered for {self.timeout_s:.1f} s")
                await asyncio.sleep(self.interval)

    async def _publish_loop(self) -> None:
        while True:
            offloader = self.engine.offloader
            if offloader is not None and not self.request.tier_node:
                # Which tier this worker reads (routing prices only its blocks as loadable);
                # asked here, off the heartbeat loop, until the tier has answered once.
                self.request.tier_node = await offloader.client.node()
            try:
                hashes = await asyncio.wait_for(self.engine.resident_hashes(), timeout=self.interval + 1.0)
            except TimeoutError:  # the engine thread is stuck or gone: nothing to advertise
                pass
            else:
                await self.residency.publish(hashes)
            await asyncio.sleep(self.interval)

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.residency.clear()
        await self.residency.close()
        async with internal_channel(self.address, self.auth) as channel:
            stub = scheduler_pb2_grpc.SchedulerStub(channel)
            try:
                await stub.DeregisterWorker(
                    scheduler_pb2.DeregisterWorkerRequest(worker_id=self.request.worker_id), timeout=2.0
                )
            except grpc.aio.AioRpcError as exc:
                log.warning("could not deregister: %s", exc.code().name)


def tier_address(config: Config) -> str:
    """The tier service this worker uses: `worker.tier_address` (its node's, in Kubernetes)."""
    return config.worker.tier_address or f"{config.tier.host}:{config.tier.port}"


def make_offloader(config: Config, costs: CostMeter) -> KvOffloader | None:
    wc = config.worker
    if not wc.kv_offload:
        return None
    if wc.max_pending_offload_blocks < 1:
        raise ConfigError(
            f"worker.max_pending_offload_blocks: must be >= 1, got {wc.max_pending_offload_blocks}"
        )
    client = TierClient(tier_address(config), auth=InternalAuth.load(config.internal))
    return KvOffloader(
        client,
        wc.offload_codec,
        wc.max_pending_offload_blocks,
        block_size=wc.block_size,
        costs=costs,
        measured_loads=wc.tier_loads is TierLoads.MEASURED,
    )


# How long a thread holding the GIL runs before another that asked for it gets it. The engine
# thread runs each step's Python between torch calls (which release the GIL) while the event loop
# and gRPC's threads serialise and send the step's tokens; with Python's 5 ms the engine waited up
# to that long for the GIL back. At 0.5 ms the stack ran 2-6 % faster in each of three alternated
# `engine_bench --modes wicore_stack` pairs (SmolLM2, 16 x 128 -> 64, two cores).
SWITCH_INTERVAL_S = 0.0005


async def serve(config: Config) -> None:
    sys.setswitchinterval(SWITCH_INTERVAL_S)
    wc = config.worker
    server = internal_server("worker", wc.host, wc.port, config)
    # The model is loaded, tuned and run on one thread (see wicore.worker.threads).
    thread = EngineThread()
    loaded = await thread.run(load_model, config)
    model_id, model, tokenizer = loaded.model_id, loaded.model, loaded.tokenizer
    defaults = ModelDefaults.from_model(model, wc.default_max_tokens)
    speculator = await thread.run(make_speculator, config, loaded)
    paged = await thread.run(PagedEngine, model, engine_config(config, model), loaded.fingerprint, speculator)
    log.info(
        "KV pool: %d blocks of %d tokens (%d tokens)",
        paged.pool.num_blocks,
        paged.pool.block_size,
        paged.max_sequence_tokens,
    )
    log.info(
        "attention: %s (worker.attention_backend: %s)", paged.runner.attention_backend, wc.attention_backend
    )
    offloader = make_offloader(config, paged.costs)
    engine = AsyncEngine(paged, tokenizer, offloader, thread)
    if offloader is not None:
        offloader.start()
    engine.start()
    metrics = WorkerMetrics(model_id, engine)
    servicer = WorkerServicer(engine, model_id, defaults, loaded.fingerprint, paged.pool.block_size, metrics)
    server.add(worker_pb2_grpc.add_WorkerServicer_to_server, servicer, "wicore.v1.Worker")
    endpoint = await start_metrics("worker", config.observability, metrics.registry)
    await server.start()
    stats = engine.stats()
    address = wc.advertise_address or f"{wc.host}:{wc.port}"
    registration = Registration(
        config,
        scheduler_pb2.RegisterWorkerRequest(
            worker_id=f"{wc.device}@{address}",
            address=address,
            device=wc.device,
            model=model_id,
            max_context=defaults.max_context,
            total_blocks=stats.total_blocks,
            block_size=stats.block_size,
            max_batch_size=wc.max_batch_size,
            fingerprint=loaded.fingerprint,
            default_max_tokens=defaults.default_max_tokens,
            tier_address=tier_address(config) if offloader is not None else "",
        ),
        engine,
    )
    await server.set_serving(True)
    registration.start()

    async def drain() -> None:
        # Leave the registry first so no new work arrives, then let streams finish.
        await registration.stop()

    try:
        await server.serve_until_signal(drain)
    finally:
        engine.stop()
        if offloader is not None:
            await offloader.stop()
        if endpoint is not None:
            await endpoint.stop()
