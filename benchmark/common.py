"""Shared pieces of the benchmarks: prompts, model loading, stacks, timing, reporting."""

from __future__ import annotations

import dataclasses
import json
import os
import random
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

# The stack launcher (tests/stack.py) and the tiny models (tests/tiny_models.py) live with the tests.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
if TYPE_CHECKING:
    from stack import Stack

_WORD_LIST = """
the of and to in is that for it as was with be by on not he this are or his from at which but have an
they you were her she there been one all we their has would when if so no what up out more said about
into than them can only other time new some could these two may first then do any like my now over such
our man me even most made after also did many before must through back years where much your way well
down should because each just those people how too little state good very make world still see own men
work long here get both between life being under never day same another know while last might us great
old year off come since against go came right used take three memory cache block attention model server
"""
WORDS = tuple(_WORD_LIST.split())


def resolve_model_dir(spec: str) -> Path:
    from wicore.config import Config
    from wicore.model_files import resolve_model

    return resolve_model(spec, Config().cache_path).path


def make_prompts(tokenizer: Any, requests: int, prompt_tokens: int, shared_prefix_tokens: int) -> list[str]:
    """Texts of random common words; the first `shared_prefix_tokens` words are the same in all."""
    rng = random.Random(1234)
    prefix = " ".join(rng.choice(WORDS) for _ in range(shared_prefix_tokens))
    prompts = []
    for _ in range(requests):
        words = [rng.choice(WORDS) for _ in range(prompt_tokens)]
        text = (prefix + " " if prefix else "") + " ".join(words)
        # Trim to the target length in tokens (a word is about one token for these).
        ids = tokenizer(text).input_ids[: shared_prefix_tokens + prompt_tokens]
        prompts.append(tokenizer.decode(ids, skip_special_tokens=True))
    return prompts


def median_seconds(fn: Callable[[], object], repeats: int) -> float:
    """The median time of `repeats` calls of fn, after one untimed call (which warms caches)."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


@dataclass
class ModeResult:
    tok_s: float
    ttft_p50_ms: float
    extra: dict[str, Any] = field(default_factory=dict)


def report(name: str, results: dict[str, list[ModeResult]], params: dict[str, Any], baseline: str) -> dict:
    """Medians over runs, a readable table with ratios against `baseline`, and the JSON object."""
    tok_s = {m: statistics.median(r.tok_s for r in runs) for m, runs in results.items()}
    ttft = {m: statistics.median(r.ttft_p50_ms for r in runs) for m, runs in results.items()}
    print(f"\n{name}: medians over {params.get('runs')} runs; ratio = tok/s / {baseline} tok/s")
    # Decode alone (tokens after the prefills, over the time after them), where a mode measures it.
    decode = {
        m: statistics.median(r.extra["decode_tok_s"] for r in runs)
        for m, runs in results.items()
        if runs and all("decode_tok_s" in r.extra for r in runs)
    }
    print(f"{'mode':<20}{'tok/s':>10}{'ttft p50 ms':>14}{'ratio':>8}{'decode tok/s':>14}")
    for mode in results:
        ratio = tok_s[mode] / tok_s[baseline] if tok_s.get(baseline) else float("nan")
        decode_text = f"{decode[mode]:>14.1f}" if mode in decode else f"{'-':>14}"
        print(f"{mode:<20}{tok_s[mode]:>10.1f}{ttft[mode]:>14.0f}{ratio:>8.2f}{decode_text}")
    return {
        "params": params,
        "tok_s": tok_s,
        "ttft_p50_ms": ttft,
        "decode_tok_s": decode,
        "runs": {m: [r.__dict__ for r in runs] for m, runs in results.items()},
    }


def write_json(path: str | None, data: dict) -> None:
    """`data` as indented JSON (dataclasses as objects, paths as strings) at `path`, if given."""
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(data, indent=2, default=_plain) + "\n")
        print(f"wrote {path}", file=sys.stderr)


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON: {type(value).__name__}")


def parse_settings(pairs: Sequence[str]) -> dict[str, Any]:
    """`--set SECTION.KEY=VALUE` flags as dotted settings, values parsed as YAML scalars."""
    import yaml

    settings: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise SystemExit(f"--set: expected SECTION.KEY=VALUE, got {pair!r}")
        settings[key] = yaml.safe_load(value)
    return settings


def service_pids(stack: Stack) -> dict[str, int]:
    """The pid of each service of a stack (gateway, scheduler, tier, worker-i), by its port."""
    from stack import pid_listening_on

    addresses = {"gateway": stack.gateway, "scheduler": stack.scheduler, "tier": stack.tier}
    addresses |= {f"worker-{i}": a for i, a in enumerate(stack.workers)}
    return {name: pid_listening_on(stack.proc.pid, int(a.rsplit(":", 1)[1])) for name, a in addresses.items()}


@dataclass(frozen=True)
class ProcessSample:
    rss_bytes: int
    open_fds: int
    threads: int
    cpu_s: float  # user + system, since the process started


def sample_process(pid: int) -> ProcessSample | None:
    """A process' RSS, open descriptors, threads and CPU time, from /proc (Linux); None when gone."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        stat = Path(f"/proc/{pid}/stat").read_text()
        fds = len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    after_name = stat.rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    cpu = (int(after_name[11]) + int(after_name[12])) / ticks  # utime, stime
    return ProcessSample(int(fields["VmRSS"].split()[0]) * 1024, fds, int(fields["Threads"]), cpu)


@contextmanager
def running_stack(model: Path, state: Path, settings: dict[str, Any], workers: int = 1) -> Iterator[Stack]:
    """`wicore up` through the tests' launcher (tests/stack.py: free ports, gateway HTTP off) with
    `settings`; its config, state and log (up.log) in `state`, up to 300 s to start. Prints the end
    of its log if the block fails; stops it, and whatever it left behind, at the end."""
    from stack import launch

    stack = launch(state, model, workers=workers, settings=settings, state_dir=state, ready_timeout_s=300)
    try:
        yield stack
    except BaseException:
        print(f"the end of the stack's log:\n{stack.log()[-3000:]}", file=sys.stderr)
        raise
    finally:
        stack.stop(timeout_s=60, leftovers=True)
