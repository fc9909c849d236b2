"""Block hashes: the keys of KV blocks everywhere (GPU prefix cache, tier, Redis, routing).

A block hash is a chain over the full blocks of a token sequence:

    root = blake2b-128("wicore-kv-v1" 0x00 model_fingerprint 0x00 cache_salt)
    h_0  = blake2b-128(root    || le_u32(tokens of block 0) || extra)
    h_i  = blake2b-128(h_{i-1} || le_u32(tokens of block i) || extra)

where `h_{i-1}` is the 16-byte digest (not its hex), `le_u32` packs each token id
as a little-endian uint32, and only full blocks are hashed. So equal hashes mean
the same model, the same salt and the same whole prefix. On the wire and in Redis a
hash is its 32 lowercase hex characters, which `validate_block_hash` enforces before
a hash is used as a key or a name (no request can smuggle in a path).
"""

from __future__ import annotations

import hashlib
import re
import struct
from collections.abc import Sequence
from typing import NewType

import xxhash

from wicore.errors import InvalidRequest

BlockHash = NewType("BlockHash", str)

DIGEST_BYTES = 16  # 128 bits
HASH_HEX_CHARS = 2 * DIGEST_BYTES
_HASH_RE = re.compile(r"[0-9a-f]{32}")
_ROOT_DOMAIN = b"wicore-kv-v1"


def _blake2b_128(*parts: bytes | bytearray | memoryview) -> hashlib.blake2b:
    h = hashlib.blake2b(digest_size=DIGEST_BYTES)
    for part in parts:
        h.update(part)
    return h


def validate_block_hash(value: str, field: str) -> BlockHash:
    """Returns `value` as a BlockHash, or raises InvalidRequest naming `field`."""
    if not isinstance(value, str) or _HASH_RE.fullmatch(value) is None:
        shown = repr(value)[:48]
        raise InvalidRequest(field, f"expected {HASH_HEX_CHARS} lowercase hex characters, got {shown}")
    return BlockHash(value)


def is_digest_hex(value: str) -> bool:
    """Whether `value` is a 128-bit digest as 32 lowercase hex characters (a hash or a checksum)."""
    return _HASH_RE.fullmatch(value) is not None


def root_hash(model_fingerprint: str, cache_salt: str = "") -> bytes:
    """The chain's root digest: folds in the model fingerprint and the tenant's salt."""
    sep = b"\x00"
    return _blake2b_128(_ROOT_DOMAIN, sep, model_fingerprint.encode(), sep, cache_salt.encode()).digest()


def chain_hashes(
    root: bytes, token_ids: Sequence[int], block_size: int, extra: bytes = b""
) -> list[BlockHash]:
    """Hashes of the full blocks of `token_ids`, first block first (see the module docstring).

    To extend a chain, pass `bytes.fromhex(last_hash)` as `root` with the tokens after it.
    """
    if block_size < 1:
        raise ValueError(f"block_size must be positive, got {block_size}")
    hashes: list[BlockHash] = []
    prev = root
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        block = token_ids[start : start + block_size]
        try:
            packed = struct.pack(f"<{block_size}I", *block)
        except struct.error:
            raise ValueError(f"token ids must fit in uint32, got block {list(block)}") from None
        h = _blake2b_128(prev, packed, extra)
        prev = h.digest()
        hashes.append(BlockHash(h.hexdigest()))
    return hashes


def reusable_blocks(num_tokens: int, block_size: int) -> int:
    """How many leading full blocks of a sequence an admission may take from a cache: all
    but the one holding the last token (at least one token must be computed)."""
    return max(0, (num_tokens - 1) // block_size)


def extend_chain(
    chain: list[BlockHash], root: bytes, token_ids: Sequence[int], block_size: int, blocks: int
) -> None:
    """Extends `chain`, the hashes of the first len(chain) full blocks of `token_ids`, in place
    to `blocks` hashes, hashing only the blocks it lacks (a request's tokens are hashed once)."""
    done = len(chain)
    if blocks <= done:
        return
    prev = bytes.fromhex(chain[-1]) if done else root
    chain += chain_hashes(prev, token_ids[done * block_size : blocks * block_size], block_size)


def reusable_chain(
    model_fingerprint: str, cache_salt: str, token_ids: Sequence[int], block_size: int
) -> list[BlockHash]:
    """Hashes of the blocks an admission of `token_ids` may take from a cache
    (`reusable_blocks`). The engine, the scheduler's router and the tiers all key
    prefixes by this."""
    usable = reusable_blocks(len(token_ids), block_size)
    return chain_hashes(
        root_hash(model_fingerprint, cache_salt), token_ids[: usable * block_size], block_size
    )


def payload_checksum(data: bytes | bytearray | memoryview) -> str:
    """XXH3-128 hex digest of a block's payload bytes: catches corruption, not forgery.

    Identity is the chained blake2b above; this only guards bytes in transit and at
    rest, where blake2b's ~1.4 GB/s here would cost more than the copy it protects
    (XXH3 hashes ~30 GB/s).
    """
    return xxhash.xxh3_128_hexdigest(data)
