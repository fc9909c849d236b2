"""`wicore generate`: a small streaming client for the terminal."""

from __future__ import annotations

import argparse
import sys

import grpc

from wicore.v1 import inference_pb2, inference_pb2_grpc


async def generate_to_terminal(args: argparse.Namespace) -> int:
    sampling = inference_pb2.SamplingParams()
    if args.temperature is not None:
        sampling.temperature = args.temperature
    if args.seed is not None:
        sampling.seed = args.seed
    request = inference_pb2.GenerateRequest(
        model=args.model, prompt=args.prompt, max_tokens=args.max_tokens, sampling=sampling
    )
    metadata = (("authorization", f"Bearer {args.api_key}"),) if args.api_key else None
    async with grpc.aio.insecure_channel(args.addr) as channel:
        stub = inference_pb2_grpc.InferenceStub(channel)
        try:
            async for msg in stub.GenerateStream(request, metadata=metadata):
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
