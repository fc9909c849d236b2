from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class StorageTier(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    STORAGE_TIER_UNSPECIFIED: _ClassVar[StorageTier]
    STORAGE_TIER_DEVICE: _ClassVar[StorageTier]
    STORAGE_TIER_CPU: _ClassVar[StorageTier]
    STORAGE_TIER_NVME: _ClassVar[StorageTier]

class Codec(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    CODEC_UNSPECIFIED: _ClassVar[Codec]
    CODEC_RAW: _ClassVar[Codec]
    CODEC_FP16: _ClassVar[Codec]
    CODEC_BF16: _ClassVar[Codec]
    CODEC_Q8: _ClassVar[Codec]
    CODEC_Q4: _ClassVar[Codec]
STORAGE_TIER_UNSPECIFIED: StorageTier
STORAGE_TIER_DEVICE: StorageTier
STORAGE_TIER_CPU: StorageTier
STORAGE_TIER_NVME: StorageTier
CODEC_UNSPECIFIED: Codec
CODEC_RAW: Codec
CODEC_FP16: Codec
CODEC_BF16: Codec
CODEC_Q8: Codec
CODEC_Q4: Codec

class BlockHeader(_message.Message):
    __slots__ = ("block_hash", "codec", "dtype", "shape", "payload_bytes", "checksum", "lz4", "sink_tokens", "source_tier")
    BLOCK_HASH_FIELD_NUMBER: _ClassVar[int]
    CODEC_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_BYTES_FIELD_NUMBER: _ClassVar[int]
    CHECKSUM_FIELD_NUMBER: _ClassVar[int]
    LZ4_FIELD_NUMBER: _ClassVar[int]
    SINK_TOKENS_FIELD_NUMBER: _ClassVar[int]
    SOURCE_TIER_FIELD_NUMBER: _ClassVar[int]
    block_hash: str
    codec: Codec
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    payload_bytes: int
    checksum: str
    lz4: bool
    sink_tokens: int
    source_tier: StorageTier
    def __init__(self, block_hash: _Optional[str] = ..., codec: _Optional[_Union[Codec, str]] = ..., dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., payload_bytes: _Optional[int] = ..., checksum: _Optional[str] = ..., lz4: _Optional[bool] = ..., sink_tokens: _Optional[int] = ..., source_tier: _Optional[_Union[StorageTier, str]] = ...) -> None: ...

class BlockChunk(_message.Message):
    __slots__ = ("header", "block_hash", "offset", "data")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    BLOCK_HASH_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    header: BlockHeader
    block_hash: str
    offset: int
    data: bytes
    def __init__(self, header: _Optional[_Union[BlockHeader, _Mapping]] = ..., block_hash: _Optional[str] = ..., offset: _Optional[int] = ..., data: _Optional[bytes] = ...) -> None: ...

class PutBlocksResponse(_message.Message):
    __slots__ = ("stored", "evicted", "evicted_hashes")
    STORED_FIELD_NUMBER: _ClassVar[int]
    EVICTED_FIELD_NUMBER: _ClassVar[int]
    EVICTED_HASHES_FIELD_NUMBER: _ClassVar[int]
    stored: int
    evicted: int
    evicted_hashes: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, stored: _Optional[int] = ..., evicted: _Optional[int] = ..., evicted_hashes: _Optional[_Iterable[str]] = ...) -> None: ...

class GetBlocksRequest(_message.Message):
    __slots__ = ("block_hashes",)
    BLOCK_HASHES_FIELD_NUMBER: _ClassVar[int]
    block_hashes: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, block_hashes: _Optional[_Iterable[str]] = ...) -> None: ...

class LookupRequest(_message.Message):
    __slots__ = ("block_hashes",)
    BLOCK_HASHES_FIELD_NUMBER: _ClassVar[int]
    block_hashes: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, block_hashes: _Optional[_Iterable[str]] = ...) -> None: ...

class LookupResponse(_message.Message):
    __slots__ = ("prefix_blocks", "tiers")
    PREFIX_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    TIERS_FIELD_NUMBER: _ClassVar[int]
    prefix_blocks: int
    tiers: _containers.RepeatedScalarFieldContainer[StorageTier]
    def __init__(self, prefix_blocks: _Optional[int] = ..., tiers: _Optional[_Iterable[_Union[StorageTier, str]]] = ...) -> None: ...

class PrefetchRequest(_message.Message):
    __slots__ = ("block_hashes",)
    BLOCK_HASHES_FIELD_NUMBER: _ClassVar[int]
    block_hashes: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, block_hashes: _Optional[_Iterable[str]] = ...) -> None: ...

class PrefetchResponse(_message.Message):
    __slots__ = ("promoted", "already_cpu", "missing")
    PROMOTED_FIELD_NUMBER: _ClassVar[int]
    ALREADY_CPU_FIELD_NUMBER: _ClassVar[int]
    MISSING_FIELD_NUMBER: _ClassVar[int]
    promoted: int
    already_cpu: int
    missing: int
    def __init__(self, promoted: _Optional[int] = ..., already_cpu: _Optional[int] = ..., missing: _Optional[int] = ...) -> None: ...

class AttentionObservation(_message.Message):
    __slots__ = ("block_hash", "mass", "blocks_in_sequence")
    BLOCK_HASH_FIELD_NUMBER: _ClassVar[int]
    MASS_FIELD_NUMBER: _ClassVar[int]
    BLOCKS_IN_SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    block_hash: str
    mass: float
    blocks_in_sequence: int
    def __init__(self, block_hash: _Optional[str] = ..., mass: _Optional[float] = ..., blocks_in_sequence: _Optional[int] = ...) -> None: ...

class UpdateScoresRequest(_message.Message):
    __slots__ = ("observations",)
    OBSERVATIONS_FIELD_NUMBER: _ClassVar[int]
    observations: _containers.RepeatedCompositeFieldContainer[AttentionObservation]
    def __init__(self, observations: _Optional[_Iterable[_Union[AttentionObservation, _Mapping]]] = ...) -> None: ...

class UpdateScoresResponse(_message.Message):
    __slots__ = ("updated", "unknown")
    UPDATED_FIELD_NUMBER: _ClassVar[int]
    UNKNOWN_FIELD_NUMBER: _ClassVar[int]
    updated: int
    unknown: int
    def __init__(self, updated: _Optional[int] = ..., unknown: _Optional[int] = ...) -> None: ...

class DropRequest(_message.Message):
    __slots__ = ("block_hashes",)
    BLOCK_HASHES_FIELD_NUMBER: _ClassVar[int]
    block_hashes: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, block_hashes: _Optional[_Iterable[str]] = ...) -> None: ...

class DropResponse(_message.Message):
    __slots__ = ("dropped",)
    DROPPED_FIELD_NUMBER: _ClassVar[int]
    dropped: int
    def __init__(self, dropped: _Optional[int] = ...) -> None: ...

class StatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class TierStats(_message.Message):
    __slots__ = ("tier", "capacity_bytes", "used_bytes", "blocks", "hits", "misses", "bytes_in", "bytes_out", "evictions", "codec", "pressure", "eviction_threshold", "time_decay_factor")
    TIER_FIELD_NUMBER: _ClassVar[int]
    CAPACITY_BYTES_FIELD_NUMBER: _ClassVar[int]
    USED_BYTES_FIELD_NUMBER: _ClassVar[int]
    BLOCKS_FIELD_NUMBER: _ClassVar[int]
    HITS_FIELD_NUMBER: _ClassVar[int]
    MISSES_FIELD_NUMBER: _ClassVar[int]
    BYTES_IN_FIELD_NUMBER: _ClassVar[int]
    BYTES_OUT_FIELD_NUMBER: _ClassVar[int]
    EVICTIONS_FIELD_NUMBER: _ClassVar[int]
    CODEC_FIELD_NUMBER: _ClassVar[int]
    PRESSURE_FIELD_NUMBER: _ClassVar[int]
    EVICTION_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    TIME_DECAY_FACTOR_FIELD_NUMBER: _ClassVar[int]
    tier: StorageTier
    capacity_bytes: int
    used_bytes: int
    blocks: int
    hits: int
    misses: int
    bytes_in: int
    bytes_out: int
    evictions: int
    codec: Codec
    pressure: float
    eviction_threshold: float
    time_decay_factor: float
    def __init__(self, tier: _Optional[_Union[StorageTier, str]] = ..., capacity_bytes: _Optional[int] = ..., used_bytes: _Optional[int] = ..., blocks: _Optional[int] = ..., hits: _Optional[int] = ..., misses: _Optional[int] = ..., bytes_in: _Optional[int] = ..., bytes_out: _Optional[int] = ..., evictions: _Optional[int] = ..., codec: _Optional[_Union[Codec, str]] = ..., pressure: _Optional[float] = ..., eviction_threshold: _Optional[float] = ..., time_decay_factor: _Optional[float] = ...) -> None: ...

class StatsResponse(_message.Message):
    __slots__ = ("tiers", "redis_ok", "policy", "blocks_demoted", "bytes_demoted", "blocks_promoted", "bytes_promoted", "corrupt_blocks", "nvme_write_errors", "node")
    TIERS_FIELD_NUMBER: _ClassVar[int]
    REDIS_OK_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    BLOCKS_DEMOTED_FIELD_NUMBER: _ClassVar[int]
    BYTES_DEMOTED_FIELD_NUMBER: _ClassVar[int]
    BLOCKS_PROMOTED_FIELD_NUMBER: _ClassVar[int]
    BYTES_PROMOTED_FIELD_NUMBER: _ClassVar[int]
    CORRUPT_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    NVME_WRITE_ERRORS_FIELD_NUMBER: _ClassVar[int]
    NODE_FIELD_NUMBER: _ClassVar[int]
    tiers: _containers.RepeatedCompositeFieldContainer[TierStats]
    redis_ok: bool
    policy: str
    blocks_demoted: int
    bytes_demoted: int
    blocks_promoted: int
    bytes_promoted: int
    corrupt_blocks: int
    nvme_write_errors: int
    node: str
    def __init__(self, tiers: _Optional[_Iterable[_Union[TierStats, _Mapping]]] = ..., redis_ok: _Optional[bool] = ..., policy: _Optional[str] = ..., blocks_demoted: _Optional[int] = ..., bytes_demoted: _Optional[int] = ..., blocks_promoted: _Optional[int] = ..., bytes_promoted: _Optional[int] = ..., corrupt_blocks: _Optional[int] = ..., nvme_write_errors: _Optional[int] = ..., node: _Optional[str] = ...) -> None: ...
