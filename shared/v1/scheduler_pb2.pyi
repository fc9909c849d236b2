from wicore.v1 import inference_pb2 as _inference_pb2
from wicore.v1 import worker_pb2 as _worker_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class WorkerLoad(_message.Message):
    __slots__ = ("running", "waiting", "free_blocks", "loaded_blocks", "spilled_blocks", "spill_failed_blocks", "spec_drafts", "spec_proposed_tokens", "spec_accepted_tokens", "prefill_tokens_per_s", "load_s_per_block")
    class LoadedBlocksEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    class LoadSPerBlockEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    RUNNING_FIELD_NUMBER: _ClassVar[int]
    WAITING_FIELD_NUMBER: _ClassVar[int]
    FREE_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    LOADED_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    SPILLED_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    SPILL_FAILED_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    SPEC_DRAFTS_FIELD_NUMBER: _ClassVar[int]
    SPEC_PROPOSED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    SPEC_ACCEPTED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    PREFILL_TOKENS_PER_S_FIELD_NUMBER: _ClassVar[int]
    LOAD_S_PER_BLOCK_FIELD_NUMBER: _ClassVar[int]
    running: int
    waiting: int
    free_blocks: int
    loaded_blocks: _containers.ScalarMap[str, int]
    spilled_blocks: int
    spill_failed_blocks: int
    spec_drafts: int
    spec_proposed_tokens: int
    spec_accepted_tokens: int
    prefill_tokens_per_s: float
    load_s_per_block: _containers.ScalarMap[str, float]
    def __init__(self, running: _Optional[int] = ..., waiting: _Optional[int] = ..., free_blocks: _Optional[int] = ..., loaded_blocks: _Optional[_Mapping[str, int]] = ..., spilled_blocks: _Optional[int] = ..., spill_failed_blocks: _Optional[int] = ..., spec_drafts: _Optional[int] = ..., spec_proposed_tokens: _Optional[int] = ..., spec_accepted_tokens: _Optional[int] = ..., prefill_tokens_per_s: _Optional[float] = ..., load_s_per_block: _Optional[_Mapping[str, float]] = ...) -> None: ...

class RegisterWorkerRequest(_message.Message):
    __slots__ = ("worker_id", "address", "device", "model", "max_context", "total_blocks", "block_size", "max_batch_size", "load", "fingerprint", "default_max_tokens", "tier_address", "tier_node")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    MAX_CONTEXT_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    BLOCK_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    LOAD_FIELD_NUMBER: _ClassVar[int]
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TIER_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    TIER_NODE_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    address: str
    device: str
    model: str
    max_context: int
    total_blocks: int
    block_size: int
    max_batch_size: int
    load: WorkerLoad
    fingerprint: str
    default_max_tokens: int
    tier_address: str
    tier_node: str
    def __init__(self, worker_id: _Optional[str] = ..., address: _Optional[str] = ..., device: _Optional[str] = ..., model: _Optional[str] = ..., max_context: _Optional[int] = ..., total_blocks: _Optional[int] = ..., block_size: _Optional[int] = ..., max_batch_size: _Optional[int] = ..., load: _Optional[_Union[WorkerLoad, _Mapping]] = ..., fingerprint: _Optional[str] = ..., default_max_tokens: _Optional[int] = ..., tier_address: _Optional[str] = ..., tier_node: _Optional[str] = ...) -> None: ...

class RegisterWorkerResponse(_message.Message):
    __slots__ = ("heartbeat_interval_s",)
    HEARTBEAT_INTERVAL_S_FIELD_NUMBER: _ClassVar[int]
    heartbeat_interval_s: float
    def __init__(self, heartbeat_interval_s: _Optional[float] = ...) -> None: ...

class HeartbeatRequest(_message.Message):
    __slots__ = ("worker_id", "load", "tier_node")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    LOAD_FIELD_NUMBER: _ClassVar[int]
    TIER_NODE_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    load: WorkerLoad
    tier_node: str
    def __init__(self, worker_id: _Optional[str] = ..., load: _Optional[_Union[WorkerLoad, _Mapping]] = ..., tier_node: _Optional[str] = ...) -> None: ...

class HeartbeatResponse(_message.Message):
    __slots__ = ("known",)
    KNOWN_FIELD_NUMBER: _ClassVar[int]
    known: bool
    def __init__(self, known: _Optional[bool] = ...) -> None: ...

class DeregisterWorkerRequest(_message.Message):
    __slots__ = ("worker_id",)
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    def __init__(self, worker_id: _Optional[str] = ...) -> None: ...

class DeregisterWorkerResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListWorkersRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class WorkerStatus(_message.Message):
    __slots__ = ("worker_id", "address", "device", "model", "load", "inflight", "seconds_since_heartbeat", "dispatched", "reserved_blocks", "total_blocks", "max_batch_size", "tier_address", "tier_node")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    LOAD_FIELD_NUMBER: _ClassVar[int]
    INFLIGHT_FIELD_NUMBER: _ClassVar[int]
    SECONDS_SINCE_HEARTBEAT_FIELD_NUMBER: _ClassVar[int]
    DISPATCHED_FIELD_NUMBER: _ClassVar[int]
    RESERVED_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    TIER_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    TIER_NODE_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    address: str
    device: str
    model: str
    load: WorkerLoad
    inflight: int
    seconds_since_heartbeat: float
    dispatched: int
    reserved_blocks: int
    total_blocks: int
    max_batch_size: int
    tier_address: str
    tier_node: str
    def __init__(self, worker_id: _Optional[str] = ..., address: _Optional[str] = ..., device: _Optional[str] = ..., model: _Optional[str] = ..., load: _Optional[_Union[WorkerLoad, _Mapping]] = ..., inflight: _Optional[int] = ..., seconds_since_heartbeat: _Optional[float] = ..., dispatched: _Optional[int] = ..., reserved_blocks: _Optional[int] = ..., total_blocks: _Optional[int] = ..., max_batch_size: _Optional[int] = ..., tier_address: _Optional[str] = ..., tier_node: _Optional[str] = ...) -> None: ...

class ListWorkersResponse(_message.Message):
    __slots__ = ("workers", "queued", "routing_policy")
    WORKERS_FIELD_NUMBER: _ClassVar[int]
    QUEUED_FIELD_NUMBER: _ClassVar[int]
    ROUTING_POLICY_FIELD_NUMBER: _ClassVar[int]
    workers: _containers.RepeatedCompositeFieldContainer[WorkerStatus]
    queued: int
    routing_policy: str
    def __init__(self, workers: _Optional[_Iterable[_Union[WorkerStatus, _Mapping]]] = ..., queued: _Optional[int] = ..., routing_policy: _Optional[str] = ...) -> None: ...
