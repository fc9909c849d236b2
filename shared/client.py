"""`wicore generate`: a small streaming client for the terminal. The prompt is sent
as a chat (the user's turn, through the model's chat template) unless `--raw`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import grpc

from wicore.v1 import inference_pb2, inference_pb2_grpc


def open_channel(address: str, ca: str = "", cert: str = "", key: str = "") -> grpc.aio.Channel:
    """A channel to the gateway: plaintext, or TLS when given a CA bundle (`--tls-ca`), presenting
    a client certificate when given one (`--tls-cert` and `--tls-key`, for a gateway with mTLS)."""
    if bool(cert) != bool(key):
        raise ValueError("--tls-cert and --tls-key: give both or neither")
    if not (ca or cert):
        return grpc.aio.insecure_channel(address)

    def read(path: str) -> bytes | None:
        return Path(path).expanduser().read_bytes() if path else None

    return grpc.aio.secure_channel(address, grpc.ssl_channel_credentials(read(ca), read(key), read(cert)))


async def generate_to_terminal(args: argparse.Namespace) -> int:
    sampling = inference_pb2.SamplingParams()
    if args.temperature is not None:
        sampling.temperature = args.temperature
    if args.seed is not None:
        sampling.seed = args.seed
    options = inference_pb2.GenerateRequest(model=args.model, max_tokens=args.max_tokens, sampling=sampling)
    metadata = (("authorization", f"Bearer {args.api_key}"),) if args.api_key else None
    try:
        channel = open_channel(args.addr, args.tls_ca, args.tls_cert, args.tls_key)
    except (OSError, ValueError) as exc:
        print(f"wicore: {exc}", file=sys.stderr)
        return 2
    async with channel:
        stub = inference_pb2_grpc.InferenceStub(channel)
        try:
            if args.raw:  # a plain completion of the prompt text
                options.prompt = args.prompt
                stream = stub.GenerateStream(options, metadata=metadata)
            else:  # the prompt as the user's turn of a chat, through the model's chat template
                message = inference_pb2.ChatMessage(role="user", content=args.prompt)
                stream = stub.ChatStream(
                    inference_pb2.ChatRequest(messages=[message], options=options), metadata=metadata
                )
            async for msg in stream:
                sys.stdout.write(msg.text)
                sys.stdout.flush()
                if msg.finish_reason:
                    reason = inference_pb2.FinishReason.Name(msg.finish_reason)
                    u = msg.usage
                    print(
                        f"\n[{reason}; prompt {u.prompt_tokens}, completion {u.completion_tokens}, "
                        f"cached {u.cached_tokens} tokens]",
                        file=sys.stderr,
                    )
        except grpc.aio.AioRpcError as exc:
            print(f"\nwicore: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return 1
    return 0
