"""The worker's threads (wicore.worker.threads): the engine thread runs what it is given in order
and the engine loop after it; other threads that touch tensors start no OpenMP threads."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from wicore.worker.async_engine import AsyncEngine
from wicore.worker.engine_types import EngineRequest
from wicore.worker.paged_engine import EngineConfig, PagedEngine
from wicore.worker.threads import EngineThread

from tiny_models import generate_greedy, save_tiny

# In a fresh process, so that no other test's threads are counted: a parallel torch operation
# on a new thread starts OpenMP threads (the control), and none on a confined one.
OPENMP_THREADS = textwrap.dedent(
    """
    import os, threading, torch
    from wicore.worker.threads import confine_openmp, confined_executor

    torch.set_num_threads(2)
    x = torch.ones(10**7)

    def started_threads(work):
        before = set(os.listdir("/proc/self/task"))
        work()
        return len(set(os.listdir("/proc/self/task")) - before)

    def on_thread(confined):
        counts = []
        def body():
            if confined:
                confine_openmp()
            counts.append(started_threads(lambda: (x * 2 + 1).sum()))
        thread = threading.Thread(target=body)
        thread.start()
        thread.join()
        return counts[0]

    executor = confined_executor("codec")
    executor.submit(int).result()  # its thread exists before counting
    by_executor = started_threads(lambda: executor.submit(lambda: float((x * 2 + 1).sum())).result())
    print(on_thread(False), on_thread(True), by_executor)
    """
)


def test_a_confined_thread_starts_no_openmp_threads() -> None:
    result = subprocess.run(
        [sys.executable, "-c", OPENMP_THREADS], capture_output=True, text=True, timeout=120, check=True
    )
    unconfined, confined, by_executor = map(int, result.stdout.split())
    assert unconfined >= 1  # the control: torch started a team for the new thread
    assert (confined, by_executor) == (0, 0)


def test_the_engine_thread_runs_calls_in_order_and_hands_back_errors() -> None:
    thread = EngineThread("test-engine")
    seen: list[tuple[int, int]] = []
    futures = [thread.submit(lambda i=i: seen.append((i, threading.get_ident())) or i) for i in range(5)]
    assert [f.result(timeout=10) for f in futures] == [0, 1, 2, 3, 4]
    assert [i for i, _ in seen] == [0, 1, 2, 3, 4]
    assert len({ident for _, ident in seen}) == 1 and seen[0][1] != threading.get_ident()
    with pytest.raises(ZeroDivisionError):
        asyncio.run(thread.run(lambda: 1 // 0))
    assert thread.submit(int, "7").result(timeout=10) == 7  # an error does not end the thread
    thread.close()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny("llama", tmp_path_factory.mktemp("llama"))


def test_the_engine_loop_runs_on_the_thread_that_built_the_engine(tiny: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny)
    prompt = [5, 9, 13, 21, 30]
    expected = generate_greedy(model, prompt, 8)
    thread = EngineThread("test-engine")
    built_on = thread.submit(threading.get_ident).result(timeout=10)
    paged = thread.submit(PagedEngine, model, EngineConfig(num_blocks=32, block_size=4), "fp").result(10)
    stepped_on: set[int] = set()
    step = paged.step
    paged.step = lambda: stepped_on.add(threading.get_ident()) or step()  # type: ignore[method-assign]
    engine = AsyncEngine(paged, tokenizer, thread=thread)
    engine.start()

    async def run() -> list[int]:
        request = EngineRequest("r", prompt, 8, stop_token_ids=frozenset())
        return [t async for delta in engine.generate(request) for t in delta.token_ids]

    try:
        assert asyncio.run(run()) == expected
    finally:
        engine.stop()
    assert stepped_on == {built_on}
