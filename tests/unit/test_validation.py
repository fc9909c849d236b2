from __future__ import annotations

import pytest

from wicore.config import GatewayConfig
from wicore.errors import InvalidRequest
from wicore.gateway.validation import validate_generate
from wicore.v1 import inference_pb2 as pb

LIMITS = GatewayConfig(max_prompt_chars=100, max_stop_strings=2, max_stop_chars=5)


@pytest.mark.parametrize(
    ("request_msg", "field"),
    [
        (pb.GenerateRequest(prompt=""), "prompt"),
        (pb.GenerateRequest(prompt="x" * 101), "prompt"),
        (pb.GenerateRequest(prompt="x", max_tokens=0), "max_tokens"),
        (pb.GenerateRequest(prompt="x", sampling=pb.SamplingParams(temperature=-1)), "sampling.temperature"),
        (
            pb.GenerateRequest(prompt="x", sampling=pb.SamplingParams(temperature=float("inf"))),
            "sampling.temperature",
        ),
        (pb.GenerateRequest(prompt="x", sampling=pb.SamplingParams(top_p=0)), "sampling.top_p"),
        (pb.GenerateRequest(prompt="x", sampling=pb.SamplingParams(top_p=float("nan"))), "sampling.top_p"),
        (pb.GenerateRequest(prompt="x", sampling=pb.SamplingParams(top_k=-3)), "sampling.top_k"),
        (pb.GenerateRequest(prompt="x", stop=["a", "b", "c"]), "stop"),
        (pb.GenerateRequest(prompt="x", stop=["toolong"]), "stop[0]"),
        (pb.GenerateRequest(prompt="x", stop=[""]), "stop[0]"),
        (pb.GenerateRequest(prompt="x", request_id="r" * 129), "request_id"),
        (pb.GenerateRequest(prompt="x", model="m" * 300), "model"),
        (pb.GenerateRequest(prompt="x", priority=99), "priority"),  # type: ignore[arg-type]
    ],
)
def test_each_bad_field_is_named(request_msg: pb.GenerateRequest, field: str) -> None:
    with pytest.raises(InvalidRequest) as err:
        validate_generate(request_msg, LIMITS)
    assert err.value.field == field
    assert str(err.value).startswith(f"{field}: ")


def test_a_good_request_passes() -> None:
    validate_generate(
        pb.GenerateRequest(
            prompt="hello",
            max_tokens=5,
            stop=["\n"],
            sampling=pb.SamplingParams(temperature=0.7, top_p=1.0, top_k=0, seed=2**64 - 1),
        ),
        LIMITS,
    )
