"""Kill -9 an NvmeTier writer at random moments: recovery must serve only intact blocks.

The writer is this file run as a script: it cycles through a fixed set of hashes,
deleting and rewriting blocks whose payload is derived from the hash, so the test
can check every byte served after each crash. Expected outcome: no temp file
survives `recover`, no final file is ever invalid (writes are atomic), and every
block served is exactly the one the writer meant.
"""

from __future__ import annotations

import hashlib
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

from wicore.kv.block import Codec, EncodedBlock
from wicore.kv.hashing import BlockHash
from wicore.tier.nvme import HEADER_SIZE, TMP_MARK, NvmeTier

HASHES = 200
KILLS = 5
CAPACITY = 1 << 30


def block_hash(i: int) -> BlockHash:
    return BlockHash(hashlib.blake2b(f"crash-{i % HASHES}".encode(), digest_size=16).hexdigest())


def intended(h: str) -> EncodedBlock:
    """A q4 header over noise (the tier never decodes a payload): 1 .. ~200 KB, most not 4096-aligned."""
    size = 1 + int(h[:5], 16) % 200_000
    payload = hashlib.shake_128(h.encode()).digest(size)
    return EncodedBlock.of(Codec.Q4, False, "bfloat16", (2, 2, 16, 1 + int(h[5], 16), 64), 4, payload)


def writer(root: Path, start: int, direct: bool) -> None:
    tier = NvmeTier(root, CAPACITY, io_depth=4, use_o_direct=direct)
    tier.recover_sync()
    print("ready", flush=True)
    for i in range(start, start + 10**9):
        h = block_hash(i)
        if tier.contains(h):
            tier.remove_blocks([h])
        tier.write_block(h, intended(h))


def test_sigkill_during_writes_never_serves_a_bad_block(tmp_path: Path) -> None:
    seed = int.from_bytes(os.urandom(4), "little")
    rng = random.Random(seed)
    served = 0
    for run in range(KILLS):
        proc = subprocess.Popen(
            [sys.executable, __file__, str(tmp_path), str(rng.randrange(HASHES)), str(run % 2)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert proc.stdout is not None
        assert proc.stdout.readline() == "ready\n", proc.communicate(timeout=10)
        time.sleep(rng.uniform(0.05, 1.0))
        assert proc.poll() is None, f"writer died on its own (seed {seed}): {proc.communicate()[1]}"
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=10)

        tier = NvmeTier(tmp_path, CAPACITY)
        recovered = tier.recover_sync(verify_payloads=True)
        assert list(tmp_path.rglob(f"*{TMP_MARK}*")) == [], f"seed {seed}"
        assert tier.stats().corrupt == 0, f"an invalid final file after kill {run} (seed {seed})"
        for r in recovered:
            got, want = tier.read_block(r.block_hash), intended(r.block_hash)
            assert got is not None and got == want, f"block {r.block_hash} (seed {seed})"  # header, payload
            assert r.size_bytes == HEADER_SIZE + want.nbytes and got.header.sink_tokens == 4
        tier.check_integrity()
        tier.close()
        served = len(recovered)
    assert served > 0, f"the writer never completed a block (seed {seed})"


if __name__ == "__main__":
    writer(Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "1")
