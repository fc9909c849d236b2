"""Block hash chain: the formula, its prefix property, validation."""

from __future__ import annotations

import hashlib
import struct

import pytest
import xxhash

from wicore.errors import InvalidRequest
from wicore.kv.hashing import chain_hashes, payload_checksum, root_hash, validate_block_hash


def _b2(*parts: bytes) -> hashlib.blake2b:
    h = hashlib.blake2b(digest_size=16)
    for part in parts:
        h.update(part)
    return h


def test_chain_matches_the_documented_formula() -> None:
    root = root_hash("model-a", "tenant-1")
    assert root == _b2(b"wicore-kv-v1", b"\x00", b"model-a", b"\x00", b"tenant-1").digest()
    tokens = [1, 2, 3, 4, 70000, 6, 7]
    h0 = _b2(root, struct.pack("<3I", 1, 2, 3), b"x")
    h1 = _b2(h0.digest(), struct.pack("<3I", 4, 70000, 6), b"x")
    assert chain_hashes(root, tokens, 3, extra=b"x") == [h0.hexdigest(), h1.hexdigest()]


def test_only_full_blocks_and_prefix_property() -> None:
    root = root_hash("m")
    assert chain_hashes(root, [1, 2, 3], 4) == []
    long = chain_hashes(root, list(range(10)), 4)
    assert len(long) == 2
    assert chain_hashes(root, list(range(8)), 4) == long
    assert chain_hashes(root, list(range(4)), 4) == long[:1]
    # A different first block changes every later hash.
    other = chain_hashes(root, [99, 1, 2, 3, 4, 5, 6, 7], 4)
    assert other[0] != long[0] and other[1] != long[1]


def test_chain_extends_from_the_last_hash() -> None:
    root = root_hash("m")
    whole = chain_hashes(root, list(range(12)), 4)
    tail = chain_hashes(bytes.fromhex(whole[0]), list(range(4, 12)), 4)
    assert tail == whole[1:]


def test_root_separates_models_salts_and_extra() -> None:
    tokens = list(range(8))
    base = chain_hashes(root_hash("m"), tokens, 4)
    assert chain_hashes(root_hash("m2"), tokens, 4) != base
    assert chain_hashes(root_hash("m", "salt"), tokens, 4) != base
    assert chain_hashes(root_hash("m"), tokens, 4, extra=b"lora") != base
    # The separator keeps ("ab", "") and ("a", "b") apart.
    assert root_hash("ab") != root_hash("a", "b")


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="block_size"):
        chain_hashes(root_hash("m"), [1], 0)
    with pytest.raises(ValueError, match="uint32"):
        chain_hashes(root_hash("m"), [1, -1], 2)
    with pytest.raises(ValueError, match="uint32"):
        chain_hashes(root_hash("m"), [1, 2**32], 2)


def test_validate_block_hash() -> None:
    good = "0123456789abcdef" * 2
    assert validate_block_hash(good, "h") == good
    for bad in ["", good.upper(), good[:-1], good + "0", "../../etc/passwd" + "0" * 16, good[:-1] + "\n"]:
        with pytest.raises(InvalidRequest) as info:
            validate_block_hash(bad, "block_hashes[3]")
        assert info.value.field == "block_hashes[3]"
        assert str(info.value).startswith("block_hashes[3]:")


def test_payload_checksum() -> None:
    data = b"kv" * 1000
    assert payload_checksum(data) == xxhash.xxh3_128_hexdigest(data)
    assert payload_checksum(data) != payload_checksum(data[:-1] + bytes([data[-1] ^ 1]))
    assert payload_checksum(bytearray(data)) == payload_checksum(memoryview(data)) == payload_checksum(data)
    assert len(payload_checksum(b"")) == 32
