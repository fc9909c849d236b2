"""The KV block's one home: what a block is, how it is named, encoded, shipped and scored.

A block is the K and V of `block_size` consecutive tokens of one sequence, for every
layer. Its path from a worker's device to disk and back, and the form it has on each
leg (four forms at most: tensor, EncodedBlock, chunks, file):

    worker (device pool)         worker (event loop)            tier service            disk
    ────────────────────         ───────────────────            ────────────            ────
    pool block ──copy──▶ tensor ──encode──▶ EncodedBlock ──chunks──▶ EncodedBlock ──▶ CPU tier (RAM)
       ▲                 [L,2,B,H,D]       (raw codec)   PutBlocks   (assembled)          │ demote:
       │                                                                                  ▼ transcode
       └──install◀─ tensor ◀─decode── EncodedBlock ◀─chunks── GetBlocks ◀── promote ◀── NVMe file
                                                                                     header + payload

    hashing.py    BlockHash and the hash chain that names a block everywhere
    block.py      StorageTier, Codec, BlockHeader, EncodedBlock
    codecs.py     encode / decode / transcode: raw, fp16, bf16, q8, q4 (+ lz4)
    attention.py  Observation and A²CR's attention estimator A(b)
    wire.py       the chunk stream and its one assembler (the only protobuf here)
    client.py     TierClient: Lookup, GetBlocks, PutBlocks, UpdateScores, Prefetch
"""
