"""One typed, frozen configuration for every service.

Sources, later ones winning: the defaults below, a YAML file (`--config`), the
environment (`WICORE_<SECTION>__<FIELD>=value`, e.g. `WICORE_GATEWAY__PORT=8001`)
and command-line flags. `load_config` is called once, in each process's entry
point, and the result is passed down; nothing below reads the environment.

The section names `gpu_config`, `gpu_pool_config` and `a2cr_config` are those of
the performance guide (docs/architecture.md).
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import math
import os
import re
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

import yaml

from wicore.errors import ConfigError
from wicore.kv.block import Codec

GiB = 1 << 30
MiB = 1 << 20
HEX_DIGITS = frozenset("0123456789abcdef")
NAMESPACE = re.compile(r"[A-Za-z0-9._-]+")  # Redis key parts: no ':', no hash-tag braces
T = typing.TypeVar("T")


class RoutingPolicy(enum.StrEnum):
    """`scheduler.routing_policy`."""

    MOR = "mor"  # the cost model
    ROUND_ROBIN = "round_robin"
    LEAST_LOADED = "least_loaded"


class TierPolicy(enum.StrEnum):
    """`tier.policy`: the tiers' eviction order."""

    A2CR = "a2cr"  # attention, frequency and recency (a2cr_config)
    LRU = "lru"  # least recently used first
    LFU = "lfu"  # least often used first


class WorkerDtype(enum.StrEnum):
    """`worker.dtype`: the model's weights and KV. `auto`: float32 on CPU; on a GPU
    `gpu_config.cuda_optimization.mixed_precision`."""

    AUTO = "auto"
    FLOAT32 = "float32"
    FLOAT16 = "float16"
    BFLOAT16 = "bfloat16"


class CpuKernels(enum.StrEnum):
    """`worker.cpu_kernels`: `auto` measures MKL and oneDNN kernels at load and multiplies each
    row count through the fastest; `onednn` uses oneDNN at every size (both not bit-identical to
    generate()); `default` keeps the model's own layers, bit for bit."""

    AUTO = "auto"
    ONEDNN = "onednn"
    DEFAULT = "default"


class TierLoads(enum.StrEnum):
    """`worker.tier_loads`: `measured` loads a prefix's tier blocks only as far as loading them
    measured faster than recomputing them on this worker; `always` loads every block found."""

    MEASURED = "measured"
    ALWAYS = "always"


class WeightQuant(enum.StrEnum):
    """`worker.weight_quant`: `int8` keeps every linear layer's weight as int8 with one scale per
    output channel (CPU workers; a quarter of fp32's bytes per decode step); `none`: the dtype's."""

    NONE = "none"
    INT8 = "int8"


class AttentionBackend(enum.StrEnum):
    """`worker.attention_backend`: `paged` reads every decode step's keys and values in place
    through the block tables with a kernel compiled for this CPU (worker/native.py), a prefix
    shared by several sequences once for all of them as `cascade` does; `cascade` does the same
    with torch's attention (each sequence's own blocks copied out per layer); `gather` copies
    each sequence's whole context (the reference). `auto`: `paged` on a CPU worker where the
    kernel builds (a C compiler is at hand), `cascade` otherwise."""

    AUTO = "auto"
    PAGED = "paged"
    CASCADE = "cascade"
    GATHER = "gather"


class ModelImpl(enum.StrEnum):
    """`worker.model_impl`: `auto` runs WiCore's own forward pass where the family has one
    (Llama, Mistral, Qwen2, Qwen3: worker/decoder.py; fewer operations per layer, the same
    arithmetic) and transformers' modules otherwise; `transformers` always runs the modules."""

    AUTO = "auto"
    TRANSFORMERS = "transformers"


class SpecMethod(enum.StrEnum):
    """`worker.speculative.method`: `ngram` proposes the continuation of the sequence's latest
    n-gram where it occurred before (prompt lookup); `draft` runs a smaller model with the same
    tokenizer; `off`: no speculation."""

    OFF = "off"
    NGRAM = "ngram"
    DRAFT = "draft"


class MixedPrecision(enum.StrEnum):
    """`gpu_config.cuda_optimization.mixed_precision`: the weights' and KV's dtype on a GPU
    worker whose worker.dtype is auto (fp32: float32, fp16: float16, bf16: bfloat16)."""

    FP32 = "fp32"
    FP16 = "fp16"
    BF16 = "bf16"


class LogFormat(enum.StrEnum):
    """`observability.log_format`: `text` (one readable line) or `json` (one object per line)."""

    TEXT = "text"
    JSON = "json"


class LogLevel(enum.StrEnum):
    """`log_level`; the names are accepted in any case, and WARN and FATAL too, as the logging
    module does."""

    DEBUG = "DEBUG"
    INFO = "INFO"
    WARNING = "WARNING"
    ERROR = "ERROR"
    CRITICAL = "CRITICAL"

    @classmethod
    def _missing_(cls, value: object) -> LogLevel | None:
        if not isinstance(value, str):
            return None
        name = value.upper()
        return cls.__members__.get({"WARN": "WARNING", "FATAL": "CRITICAL"}.get(name, name))


DEVICES_HELP = "'cpu', 'gpu:N', or (for wicore up) a comma-separated list of them or 'auto'"


def is_device(name: str) -> bool:
    """One worker's device: `cpu` or `gpu:N`."""
    return name == "cpu" or (name.startswith("gpu:") and name[4:].isascii() and name[4:].isdigit())


def is_device_spec(spec: str) -> bool:
    """A device, a comma-separated list of devices, or `auto` (every GPU plus one CPU worker)."""
    names = [d.strip() for d in spec.split(",") if d.strip()]
    return spec.strip() == "auto" or (bool(names) and all(is_device(d) for d in names))


@dataclass(frozen=True, slots=True)
class CudaOptimization:
    """A GPU worker's CUDA switches; a CPU worker ignores them."""

    enable_cudnn: bool = True  # torch.backends.cudnn.enabled
    enable_tensor_cores: bool = False  # true: float32 matmuls and convolutions may use TF32
    mixed_precision: MixedPrecision = MixedPrecision.BF16  # the dtype when worker.dtype is auto


@dataclass(frozen=True, slots=True)
class GpuConfig:
    target_devices: tuple[str, ...] = ("cpu",)  # `wicore up`'s devices if not --device or worker.device
    # The share of the device's memory a GPU worker may use: weights, one step's activations and
    # the KV pool, which takes what is left (as vLLM's gpu_memory_utilization).
    gpu_memory_utilization: float = 0.9
    memory_limit_per_gpu: float = 0.0  # GiB: a cap on the KV pool per device; 0: no cap (the above)
    enable_p2p: bool = False  # accepted, no effect: KV moves between workers through the tier service
    cuda_optimization: CudaOptimization = field(default_factory=CudaOptimization)

    def __post_init__(self) -> None:
        if not is_device_spec(",".join(self.target_devices)):
            raise ConfigError(f"target_devices: expected {DEVICES_HELP}, got {list(self.target_devices)!r}")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ConfigError(
                f"gpu_memory_utilization: must be in (0, 1] (a share of the device's memory), "
                f"got {self.gpu_memory_utilization}"
            )
        if not self.memory_limit_per_gpu >= 0.0:
            raise ConfigError(
                f"memory_limit_per_gpu: must be >= 0 GiB (0: no cap, gpu_memory_utilization decides), "
                f"got {self.memory_limit_per_gpu}"
            )


@dataclass(frozen=True, slots=True)
class GpuPoolConfig:
    """Accepted for the performance guide's sake, with no effect (a worker warns when one is set):
    each worker preallocates its KV pool once, in blocks of worker.block_size tokens."""

    initial_size: int = 0
    max_size: int = 0
    block_size: int = 4096  # byte alignment of pool allocations
    enable_defragmentation: bool = False


@dataclass(frozen=True, slots=True)
class A2crConfig:
    """A²CR's weights and parameters (services/tier/policy.py has the formula). The performance
    guide's weights were 0.4 / 0.3 / 0.3; measured (benchmark/policy_replay.py), any weight on
    the attention share or on short-horizon recency lowers hit rates, so the defaults rank by
    the decayed frequency alone (README, "A²CR eviction")."""

    time_decay_factor: float = 0.05
    attention_weight: float = 0.0
    frequency_weight: float = 1.0
    recency_weight: float = 0.0
    frequency_horizon: float = 300.0  # seconds: F's hit count decays as exp(-idle / frequency_horizon)
    # an NVMe hit enters a full CPU tier only if read more often than its median resident
    promotion_admission: bool = True
    eviction_threshold: float = 0.2
    cleanup_interval: float = 60.0
    adaptive: bool = True  # scale threshold and decay with tier pressure at each cleanup (tier/policy.py)


@dataclass(frozen=True, slots=True)
class ApiKey:
    """One API key, by its SHA-256 digest (`wicore keygen` makes both): never the key itself."""

    sha256: str = ""  # 64 hex digits
    tenant: str = ""

    def __post_init__(self) -> None:
        if len(self.sha256) != 64 or not all(c in HEX_DIGITS for c in self.sha256.lower()):
            # The value is not echoed: it may be a key pasted by mistake.
            raise ConfigError(
                f"sha256: not a 64-hex SHA-256 digest{f' (tenant {self.tenant!r})' if self.tenant else ''}; "
                "a config file holds keys' digests only ('wicore keygen' prints one)"
            )
        if not self.tenant:
            raise ConfigError("tenant: must name the key's tenant")
        object.__setattr__(self, "sha256", self.sha256.lower())


@dataclass(frozen=True, slots=True)
class TenantLimits:
    max_concurrent_requests: int = 0  # requests of this tenant in flight at once; 0: no own limit
    max_tokens: int = 0  # a request's max_tokens at most; 0: no own limit

    def __post_init__(self) -> None:
        for name in ("max_concurrent_requests", "max_tokens"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name}: must be >= 0 (0: no limit), got {getattr(self, name)}")


@dataclass(frozen=True, slots=True)
class ApiKeys:
    """API keys and tenants: `gateway.api_keys` / `gateway.tenants`, and the same shape in
    `gateway.api_keys_file` (see services/gateway/auth.py)."""

    api_keys: tuple[ApiKey, ...] = ()
    tenants: Mapping[str, TenantLimits] = field(default_factory=lambda: MappingProxyType({}))


@dataclass(frozen=True, slots=True)
class GatewayConfig:
    host: str = "127.0.0.1"
    port: int = 50051
    api_keys: tuple[ApiKey, ...] = ()  # {sha256, tenant} each; none (and no api_keys_file): no authentication
    tenants: Mapping[str, TenantLimits] = field(default_factory=lambda: MappingProxyType({}))  # by name
    api_keys_file: str = ""  # YAML with more `api_keys` and `tenants`, re-read when it changes
    tls_cert: str = ""  # PEM certificate chain: TLS on the public ports (gRPC and HTTP)
    tls_key: str = ""  # its PEM private key
    tls_client_ca: str = ""  # PEM CA bundle: clients must present a certificate it signed (mTLS)
    http_port: int = 8000  # the OpenAI-compatible HTTP API; 0: off
    max_http_body_bytes: int = 8 * MiB  # larger HTTP request bodies get 413, unparsed
    max_concurrent_requests: int = 256
    max_prompt_chars: int = 1_000_000  # a prompt's, or a chat's messages' content together
    max_messages: int = 1024  # per chat request
    scheduler_retry_s: float = 30.0  # a request outlives a scheduler restart this long (resent, resumed)
    max_stop_strings: int = 16
    max_stop_chars: int = 256


@dataclass(frozen=True, slots=True)
class SchedulerConfig:
    host: str = "127.0.0.1"
    port: int = 50052
    heartbeat_interval_s: float = 1.0
    worker_timeout_s: float = 5.0  # a worker silent this long is dropped
    routing_policy: RoutingPolicy = RoutingPolicy.MOR
    max_queue_size: int = 1024  # requests waiting in the scheduler; more get RESOURCE_EXHAUSTED
    max_batch_size: int = 0  # requests in flight per worker; 0: the worker's own max_batch_size
    max_wait_time_s: float = 0.0  # hold a partial batch for an idle worker this long (0: never)
    aging_interval_s: float = 10.0  # a queued request gains one priority level per interval waited
    max_imbalance: int = 4  # a worker never gets more than this many requests above the least loaded
    prefix_weight: float = 1.0  # MoR: weight of the prefill left to compute (see router.py)
    queue_weight: float = 1.0  # MoR: weight of the worker's occupancy
    prefill_scale_tokens: int = 512  # MoR: uncomputed prompt tokens that count as a full prefill term
    tier_cpu_cost: float = 0.2  # MoR: loading a block from the CPU tier, as a fraction of recomputing it
    tier_nvme_cost: float = 0.5  # MoR: the same from NVMe
    attention_scale_tokens: int = 512  # MoR: prompt + max tokens at which a request counts as heaviest
    # MoR: a request may wait for a busy worker holding its prefix up to this factor times the
    # prefill it would save there (0: never waits; see router.py)
    prefix_wait_factor: float = 1.0
    # MoR: a worker's prefill speed until it reports its measured one (prices that wait)
    assumed_prefill_tokens_per_s: float = 1000.0
    redis_timeout_s: float = 0.2  # residency lookups give up after this (routing then ignores prefixes)
    prefetch: bool = True  # ask the tier to move a queued request's NVMe prefix blocks to CPU RAM

    def __post_init__(self) -> None:
        if not (math.isfinite(self.prefix_wait_factor) and self.prefix_wait_factor >= 0):
            raise ConfigError(
                f"prefix_wait_factor: must be a finite number >= 0, got {self.prefix_wait_factor}"
            )
        rate = self.assumed_prefill_tokens_per_s
        if not (math.isfinite(rate) and rate > 0):
            raise ConfigError(f"assumed_prefill_tokens_per_s: must be a finite number > 0, got {rate}")


@dataclass(frozen=True, slots=True)
class SpeculativeConfig:
    """Speculative decoding: proposals for decoding sequences, verified by the model in its step."""

    method: SpecMethod = SpecMethod.OFF
    num_tokens: int = 4  # k: proposals per sequence and step, at most (adaptive below it)
    ngram_min: int = 2  # ngram: the shortest suffix looked up
    ngram_max: int = 4  # ngram: the longest (tried first)
    draft_model: str = ""  # draft: a local model directory (a causal LM with the same tokenizer)
    draft_kv_cache_bytes: int = 256 * MiB  # draft: its own KV pool
    # No speculation in a step with more running sequences than this: decode is no longer
    # bound by memory bandwidth there, so verifying proposals costs nearly what they save.
    disable_by_batch_size: int = 8

    def __post_init__(self) -> None:
        if not 1 <= self.num_tokens <= 16:
            raise ConfigError(f"num_tokens: must be in [1, 16], got {self.num_tokens}")
        if not 1 <= self.ngram_min <= self.ngram_max:
            raise ConfigError(
                "ngram_min, ngram_max: need 1 <= ngram_min <= ngram_max, "
                f"got {self.ngram_min}, {self.ngram_max}"
            )
        if self.method is SpecMethod.DRAFT and not self.draft_model:
            raise ConfigError("draft_model: method draft needs a draft model directory")
        if self.draft_kv_cache_bytes < 1:
            raise ConfigError(f"draft_kv_cache_bytes: must be > 0, got {self.draft_kv_cache_bytes}")
        if self.disable_by_batch_size < 1:
            raise ConfigError(f"disable_by_batch_size: must be >= 1, got {self.disable_by_batch_size}")


@dataclass(frozen=True, slots=True)
class WorkerConfig:
    host: str = "127.0.0.1"
    port: int = 50060  # worker i of `wicore up` listens on port + i
    advertise_address: str = ""  # host:port the scheduler calls (e.g. a pod's IP); default host:port
    tier_address: str = ""  # host:port of the tier service it spills to (its node's); default tier's
    model: str = "smollm2"  # "smollm2" (the bundled default) or a local HF model directory
    model_id: str = ""  # the name clients use; default: derived from the model
    device: str = "cpu"  # "cpu" or "gpu:N"; `wicore up` also takes a comma-separated list or "auto"
    dtype: WorkerDtype = WorkerDtype.AUTO
    max_batch_size: int = 64  # sequences running at once
    default_max_tokens: int = 256
    block_size: int = 16  # tokens per KV block
    kv_cache_bytes: int = 1 * GiB  # KV pool on CPU; on a GPU gpu_config.gpu_memory_utilization decides
    max_num_batched_tokens: int = 512  # tokens computed per engine step (chunked prefill)
    cpu_kernels: CpuKernels = CpuKernels.AUTO
    attention_backend: AttentionBackend = AttentionBackend.AUTO
    model_impl: ModelImpl = ModelImpl.AUTO
    weight_quant: WeightQuant = WeightQuant.NONE
    num_threads: int = 0  # torch threads on CPU; 0: torch's default (`wicore up` splits the cores)
    kv_offload: bool = True  # spill reclaimed prefix blocks to the tier service and load them back
    offload_codec: Codec = Codec.RAW  # how blocks travel to the tier (it stores them in its tiers' codecs)
    tier_loads: TierLoads = TierLoads.MEASURED  # load tier blocks only while faster than recomputing
    max_pending_offload_blocks: int = 256  # host copies waiting for the tier; past this, spills are dropped
    attention_sample_every: int = 8  # measure block attention for A²CR every n-th engine step (0: never)
    speculative: SpeculativeConfig = field(default_factory=SpeculativeConfig)

    def __post_init__(self) -> None:
        if not is_device_spec(self.device):
            raise ConfigError(f"device: expected {DEVICES_HELP}, got {self.device!r}")


@dataclass(frozen=True, slots=True)
class TierConfig:
    host: str = "127.0.0.1"
    port: int = 50053
    cpu_capacity_bytes: int = 2 * GiB  # 0: no CPU tier (blocks go straight to NVMe)
    cpu_codec: Codec = Codec.Q8  # raw (lossless), fp16, bf16, q8 or q4
    nvme_capacity_bytes: int = 16 * GiB  # 0: no NVMe tier
    nvme_codec: Codec = Codec.Q4
    nvme_dir: str = ""  # default: {state_dir}/nvme
    io_depth: int = 8  # NVMe reads and writes in flight
    use_o_direct: bool = False  # bypass the page cache where the filesystem allows it
    use_lz4: bool = True  # lz4 frames, kept only when they save 1/64 or more
    policy: TierPolicy = TierPolicy.A2CR  # eviction order
    high_watermark: float = 0.9  # a tier this full (used / capacity) frees bytes ...
    low_watermark: float = 0.8  # ... down to this
    chunk_bytes: int = 1 * MiB  # well under gRPC's 4 MiB message limit
    max_block_bytes: int = 256 * MiB
    # This tier's name: Redis keys and routing tell tiers apart by it (one tier per node in
    # Kubernetes, named after the node); workers learn it from the tier they use.
    node: str = "local"

    def __post_init__(self) -> None:
        if not NAMESPACE.fullmatch(self.node):
            raise ConfigError(f"node: letters, digits, '.', '_' or '-' only, got {self.node!r}")


def redacted_url(url: str) -> str:
    """`url` with any credentials replaced by *** (for messages and logs)."""
    scheme, sep, rest = url.partition("://")
    _, at, location = rest.rpartition("@")
    return f"{scheme}{sep}{'***@' if at else ''}{location}" if sep else url.rpartition("@")[2]


@dataclass(frozen=True, slots=True)
class RedisConfig:
    """Where the shared metadata lives. The URL may carry credentials and TLS (`rediss://`);
    the fields below are for what a URL should not hold (a password from a Secret, say)."""

    url: str = "redis://127.0.0.1:6379/0"  # redis://, rediss:// (TLS) or unix://
    namespace: str = "wicore"
    username: str = ""  # an ACL user; "": the URL's, or `default`
    password: str = ""  # "": the URL's, or none (set it through WICORE_REDIS__PASSWORD)
    tls_ca_file: str = ""  # PEM CA bundle that signed the server's certificate (rediss://)
    tls_cert_file: str = ""  # PEM client certificate, when the server asks for one
    tls_key_file: str = ""  # its private key
    cluster: bool = False  # a Redis Cluster: the URL names any one of its nodes

    def __post_init__(self) -> None:
        if not self.url.startswith(("redis://", "rediss://", "unix://")):
            raise ConfigError(f"url: expected redis://, rediss:// or unix://, got {redacted_url(self.url)!r}")
        tls = [n for n in ("tls_ca_file", "tls_cert_file", "tls_key_file") if getattr(self, n)]
        if tls and not self.url.startswith("rediss://"):
            raise ConfigError(f"{tls[0]}: TLS needs a rediss:// url, got {redacted_url(self.url)!r}")
        if self.cluster and self.url.startswith("unix://"):
            raise ConfigError("cluster: a Redis Cluster is reached over TCP, not a unix socket")
        if bool(self.tls_cert_file) != bool(self.tls_key_file):
            raise ConfigError("tls_cert_file and tls_key_file: set both or neither")
        if not NAMESPACE.fullmatch(self.namespace):
            raise ConfigError(f"namespace: letters, digits, '.', '_' or '-' only, got {self.namespace!r}")


@dataclass(frozen=True, slots=True)
class InternalConfig:
    """The shared token the internal services (scheduler, workers, tier) require of their callers
    (see shared/channels.py). None set: they accept everyone, with a warning; `wicore up`
    generates one into the state directory."""

    token: str = ""
    token_file: str = ""  # a file holding the token (its first line)


@dataclass(frozen=True, slots=True)
class ObservabilityConfig:
    """Traces (OpenTelemetry, OTLP over gRPC), Prometheus metrics and the log format (see
    shared/tracing.py, shared/metrics.py and docs/observability.md)."""

    otlp_endpoint: str = ""  # e.g. http://jaeger:4317; "": no traces are made or sent
    sample_ratio: float = 1.0  # of new traces; a request with a sampled parent is always traced
    metrics_host: str = "127.0.0.1"  # where /metrics listens
    metrics_port: int = 9400  # this service's /metrics (`wicore up`: this one, then the next ones); 0: off
    log_format: LogFormat = LogFormat.TEXT

    def __post_init__(self) -> None:
        if not 0.0 <= self.sample_ratio <= 1.0:
            raise ConfigError(f"sample_ratio: must be in [0, 1], got {self.sample_ratio}")
        if not 0 <= self.metrics_port <= 65535:
            raise ConfigError(f"metrics_port: must be in [0, 65535] (0: off), got {self.metrics_port}")
        endpoint = self.otlp_endpoint
        if endpoint and ("://" in endpoint and not endpoint.startswith(("http://", "https://"))):
            raise ConfigError(
                f"otlp_endpoint: expected host:port, http://host:port or https://..., got {endpoint!r}"
            )


@dataclass(frozen=True, slots=True)
class Config:
    gateway: GatewayConfig = field(default_factory=GatewayConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    worker: WorkerConfig = field(default_factory=WorkerConfig)
    tier: TierConfig = field(default_factory=TierConfig)
    redis: RedisConfig = field(default_factory=RedisConfig)
    internal: InternalConfig = field(default_factory=InternalConfig)
    gpu_config: GpuConfig = field(default_factory=GpuConfig)
    gpu_pool_config: GpuPoolConfig = field(default_factory=GpuPoolConfig)
    a2cr_config: A2crConfig = field(default_factory=A2crConfig)
    observability: ObservabilityConfig = field(default_factory=ObservabilityConfig)
    state_dir: str = "~/.wicore"
    cache_dir: str = "~/.cache/wicore"
    log_level: LogLevel = LogLevel.INFO
    shutdown_grace_s: float = 10.0

    @property
    def state_path(self) -> Path:
        return Path(self.state_dir).expanduser()

    @property
    def cache_path(self) -> Path:
        return Path(self.cache_dir).expanduser()


ENV_PREFIX = "WICORE_"
# Keys that live elsewhere now (where the performance guide puts them).
MOVED = {"gpu_config.enable_tensor_cores": "gpu_config.cuda_optimization.enable_tensor_cores"}


def load_config(
    path: str | Path | None = None,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Config:
    """Builds the config from file, environment and dotted overrides ("gateway.port": 1)."""
    data: dict[str, Any] = {}
    if path is not None:
        text = Path(path).expanduser().read_text()
        loaded = yaml.safe_load(text) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: expected a mapping at the top level")
        data = loaded
    sections = {f.name for f in dataclasses.fields(Config)}
    for key, raw in (env or {}).items():
        dotted = key[len(ENV_PREFIX) :].lower().replace("__", ".")
        # Other WICORE_* variables (test settings, say) are not configuration.
        if key.startswith(ENV_PREFIX) and dotted.split(".")[0] in sections:
            _set_dotted(data, dotted, yaml.safe_load(raw) if raw != "" else "")
    for dotted, value in (overrides or {}).items():
        if value is not None:
            _set_dotted(data, dotted, value)
    return _build(Config, data, "")


def config_from_environ(path: str | Path | None, overrides: Mapping[str, Any]) -> Config:
    """The entry points' way in: file + this process's environment + flags."""
    return load_config(path, os.environ, overrides)


def to_dict(config: Config) -> dict[str, Any]:
    """Plain data (tuples as lists) that `load_config` reads back unchanged."""

    def plain(value: Any) -> Any:
        if dataclasses.is_dataclass(value):
            return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
        if isinstance(value, tuple):
            return [plain(v) for v in value]
        if isinstance(value, enum.Enum):
            return value.value
        if isinstance(value, Mapping):
            return {k: plain(v) for k, v in value.items()}
        return value

    return typing.cast(dict[str, Any], plain(config))


def _set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    node = data
    for part in parents:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{dotted}: {part} is not a section")
        node = child
    node[leaf] = value


def build(cls: type[T], data: Any, where: str) -> T:
    """A config dataclass from plain data (a YAML mapping); errors name `where` and the key."""
    return typing.cast(T, _build(cls, data, where))


def _build(cls: type, data: Any, where: str) -> Any:
    if not isinstance(data, dict):
        # The type only: the value may be a secret put where a section belongs.
        keys = ", ".join(f.name for f in dataclasses.fields(cls))
        raise ConfigError(f"{where or 'config'}: expected a mapping ({keys}), got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        dotted = f"{where + '.' if where else ''}{unknown[0]}"
        if dotted in MOVED:
            raise ConfigError(f"{dotted}: moved to {MOVED[dotted]}")
        raise ConfigError(f"{dotted}: unknown setting (known: {sorted(names)})")
    kwargs = {
        name: _coerce(hints[name], value, f"{where}.{name}" if where else name)
        for name, value in data.items()
    }
    try:
        return cls(**kwargs)
    except ConfigError as exc:  # a dataclass's own check (__post_init__), naming its field
        raise ConfigError(f"{where + '.' if where else ''}{exc}") from None


def _coerce(hint: Any, value: Any, where: str) -> Any:
    if dataclasses.is_dataclass(hint):
        return _build(typing.cast(type, hint), value, where)
    origin = typing.get_origin(hint)
    if origin is tuple:
        (item,) = {a for a in typing.get_args(hint) if a is not Ellipsis}
        if isinstance(value, str):
            value = [v for v in value.split(",") if v]
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return tuple(_coerce(item, v, f"{where}[{i}]") for i, v in enumerate(value))
    if origin is Mapping:
        key_hint, value_hint = typing.get_args(hint)
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__}")
        return MappingProxyType(
            {_coerce(key_hint, k, where): _coerce(value_hint, v, f"{where}.{k}") for k, v in value.items()}
        )
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        with contextlib.suppress(ValueError, TypeError):
            return hint(value)  # a member's value, or what the enum's _missing_ accepts
        allowed = ", ".join(repr(m.value) for m in hint)
        raise ConfigError(f"{where}: expected one of {allowed}, got {value!r}")
    if origin in (typing.Union, types.UnionType):
        raise ConfigError(f"{where}: unsupported union type")
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if hint is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if hint is str:
        if isinstance(value, str | int | float) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    raise ConfigError(f"{where}: unsupported type {hint!r}")
