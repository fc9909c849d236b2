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

from wicore.hashing import BlockHash
from wicore.tier.nvme import TMP_MARK, NvmeBlockMeta, NvmeTier

HASHES = 200
KILLS = 5
CAPACITY = 1 << 30


def block_hash(i: int) -> BlockHash:
    return BlockHash(hashlib.blake2b(f"crash-{i % HASHES}".encode(), digest_size=16).hexdigest())


def intended(h: str) -> tuple[NvmeBlockMeta, bytes]:
    size = int(h[:5], 16) % 200_000  # 0 .. ~200 KB, most not 4096-aligned
    payload = hashlib.shake_128(h.encode()).digest(size)
    meta = NvmeBlockMeta.describe(h, payload, "q4", "bfloat16", (2, int(h[5], 16), size), sink_tokens=4)
    return meta, payload


def writer(root: Path, start: int, direct: bool) -> None:
    tier = NvmeTier(root, CAPACITY, io_depth=4, use_o_direct=direct)
    tier.recover()
    print("ready", flush=True)
    for i in range(start, start + 10**9):
        h = block_hash(i)
        if tier.contains(h):
            tier.delete(h)
        tier.put(*intended(h))


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
        metas = tier.recover(verify_payloads=True)
        assert list(tmp_path.rglob(f"*{TMP_MARK}*")) == [], f"seed {seed}"
        assert tier.stats().corrupt == 0, f"an invalid final file after kill {run} (seed {seed})"
        for meta in metas:
            got = tier.get(meta.block_hash)
            want_meta, want_payload = intended(meta.block_hash)
            assert got is not None and got[1] == want_payload, f"block {meta.block_hash} (seed {seed})"
            assert got[0] == meta and meta.shape == want_meta.shape and meta.sink_tokens == 4
        tier.check_integrity()
        tier.close()
        served = len(metas)
    assert served > 0, f"the writer never completed a block (seed {seed})"


if __name__ == "__main__":
    writer(Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "1")
