"""Speculative decoding in the engine: tokens/s, inter-token latency and acceptance of each
method (off, ngram, draft) on three workloads, in the same run, and what verifying more
positions costs an engine step.

    python benchmark/spec_bench.py --model smollm2 --new-tokens 128 --runs 3 --json OUT \\
        [--methods off,ngram,draft] [--workloads chat,rewrite,code] [--batch 1] \\
        [--draft-layers 8 | --draft-model DIR] [--set worker.speculative.num_tokens=4 ...] \\
        [--no-verify-cost] [--verify-max-batch 16] [--verify-k 0,2,4]

In process: the worker's own loader (`load_model`, `make_speculator`, `engine_config`, with
--set applied) and a `PagedEngine` driven step by step, no gRPC stack. Greedy, stopping at
the model's EOS tokens (--ignore-eos: exactly --new-tokens each).

Methods: `off` (no speculator), `ngram` (prompt lookup), `draft` (a draft model in its own
engine). Only SmolLM2-135M is available offline, so the default draft is a pruned SmolLM2:
the target's first --draft-layers decoder layers (embeddings, final norm and LM head kept),
saved with the tokenizer to a temporary directory; --draft-model DIR uses another one.

Workloads (prompts in this file; chat and rewrite through the tokenizer's chat template
when it has one, code as plain text to continue):
  chat      open questions: little in the answer repeats the prompt
  rewrite   rewrite or summarise a ~200-word passage: the output overlaps the input
  code      complete a Python class or test file full of repeated identifiers
--batch B runs B requests of a workload at a time (its prompts reused cyclically when B is
larger than their number); the default 1 runs them one after another.

Per method and workload, medians over --runs (a fresh engine and speculator per run, so no
run starts with a warm prefix cache or a trained acceptance estimate; each is warmed up by
a short request first, not timed):
  tok/s        generated tokens / wall time of the whole workload (prefills included)
  speedup      tok/s / off's tok/s on the same workload
  ITL p50 ms   inter-token latency: the gap between two successive step outputs of a request
               divided by the number of tokens the later output carries, counted once for
               each of those tokens (a step that emits 3 tokens after 60 ms: 3 x 20 ms); the
               median over the workload's tokens (first tokens excluded: that is TTFT)
  acceptance   accepted / proposed tokens (the speculator's stats, over the runs; off: none)
  tok/verify   tokens emitted per step that verified proposals (accepted + 1)
  mismatches   requests whose output differs from off's for the same prompt (must be 0:
               greedy speculative decoding emits exactly the tokens plain decoding does)

Verify cost (on by default; --no-verify-cost skips it): for batch sizes 1, 2, 4, ... up to
--verify-max-batch, decoding sequences after --verify-prompt-tokens prompts, the time of the
model runner's step (`ModelRunner.run`, median of --verify-steps) when each computes 1, 3 or
5 positions (k = 0, 2, 4 proposals, or each k of --verify-k; their blocks allocated as the
scheduler allocates them for proposals):
  cost/pos     (t(k) / t(0) - 1) / k: an extra position's cost relative to a plain decode step,
               what TOKEN_COST in services/worker/speculative.py approximates
  gain k=4     expected tokens of a k = 4 step at acceptance --alpha, (1 - a^5) / (1 - a),
               over its cost t(4) / t(0); speculation stops paying at the first batch size
               where it falls below 1 (the proposals' own cost left out: nil for ngram)

The engine proposes nothing in a step with more running sequences than
worker.speculative.disable_by_batch_size (4): raise it with --set to measure a larger --batch.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import make_prompts, parse_settings, percentile, resolve_model_dir, write_json
from serving import machine, markdown_table

METHODS = ("off", "ngram", "draft")
WORKLOADS = ("chat", "rewrite", "code")
VERIFY_K = (0, 2, 4)
WARM_UP = "Warm up: one short request before the timed ones."

CHAT = [
    "Tell me about the history of tea.",
    "What should I cook tonight? I have rice, eggs, spinach and some cheese.",
    "How do airplanes stay in the air?",
    "Give me some advice for my first day at a new job.",
]

BICYCLES = """\
The first bicycles appeared in Europe at the start of the nineteenth century. They had no pedals:
riders sat on a wooden frame between two wheels and pushed themselves along with their feet. In
the 1860s, French makers fixed pedals to the front wheel, and the machine became popular in cities,
although its iron tyres made every ride on cobblestones painfully rough. To go faster, designers
made the front wheel larger and larger, which produced the famous high wheeler. It was fast, but
it was also dangerous, because a rider who hit a stone could be thrown over the handlebars. The
safety bicycle of the 1880s solved this problem. It had two wheels of the same size, a chain that
drove the rear wheel, and soon afterwards air-filled rubber tyres. Suddenly cycling was
comfortable, safe and cheap enough for workers, and millions of people bought bicycles. Women in
particular gained a new freedom to travel on their own, and the bicycle helped to change the
clothes they wore. Many of the ideas first tried on bicycles, such as ball bearings, chains and
pneumatic tyres, were later used in cars and aircraft."""

HONEY = """\
Honey bees make honey from the nectar of flowers, and the work is shared among thousands of
insects. Forager bees visit flowers and drink the sweet nectar, storing it in a special stomach
that is separate from the one they use for their own food. A single forager may visit hundreds of
flowers on one trip before she flies back to the hive. There she passes the nectar to younger
house bees, mouth to mouth. The house bees chew the nectar for a while, adding enzymes that break
its sugars into simpler ones, and then they spread it in thin layers inside the wax cells of the
comb. Fresh nectar is mostly water, so the bees fan their wings over the cells to help the water
evaporate. When the honey is thick enough, they seal each cell with a cap of wax, and the honey can
then keep for years without spoiling. A strong colony can store far more honey than it needs to
survive the winter, which is why beekeepers are able to take some of it without harming the bees.
To make one jar of honey, the bees of a hive together fly a distance of many thousands of
kilometres."""

REWRITE = [
    f"Rewrite the following passage in simpler words:\n\n{BICYCLES}",
    f"Summarise this passage:\n\n{HONEY}",
    f"Rewrite the following passage in simpler words:\n\n{HONEY}",
]

INVENTORY = '''\
class Inventory:
    """Items in a warehouse, by SKU: how many there are and what each costs."""

    def __init__(self) -> None:
        self.quantities: dict[str, int] = {}
        self.prices: dict[str, float] = {}

    def add_item(self, sku: str, quantity: int, price: float) -> None:
        self.quantities[sku] = self.quantities.get(sku, 0) + quantity
        self.prices[sku] = price

    def remove_item(self, sku: str, quantity: int) -> None:
        if self.quantities.get(sku, 0) < quantity:
            raise ValueError(f"not enough of {sku}")
        self.quantities[sku] -= quantity

    def total_value(self) -> float:
        return sum(self.quantities[sku] * self.prices[sku] for sku in self.quantities)

    def low_stock(self, threshold: int) -> list[str]:
        """The SKUs with fewer than `threshold` items left."""
'''

VECTOR = """\
from dataclasses import dataclass


@dataclass(frozen=True)
class Vector:
    x: float
    y: float
    z: float

    def __add__(self, other: "Vector") -> "Vector":
        return Vector(self.x + other.x, self.y + other.y, self.z + other.z)

    def __sub__(self, other: "Vector") -> "Vector":
        return Vector(self.x - other.x, self.y - other.y, self.z - other.z)

    def __mul__(self, scalar: float) -> "Vector":
        return Vector(self.x * scalar, self.y * scalar, self.z * scalar)

    def dot(self, other: "Vector") -> float:
        return self.x * other.x + self.y * other.y + self.z * other.z

    def cross(self, other: "Vector") -> "Vector":
"""

STACK_TESTS = """\
import unittest

from stack import Stack


class StackTest(unittest.TestCase):
    def setUp(self) -> None:
        self.stack = Stack()

    def test_push_adds_an_item(self) -> None:
        self.stack.push(1)
        self.assertEqual(len(self.stack), 1)
        self.assertEqual(self.stack.peek(), 1)

    def test_pop_returns_the_last_item(self) -> None:
        self.stack.push(1)
        self.stack.push(2)
        self.assertEqual(self.stack.pop(), 2)
        self.assertEqual(len(self.stack), 1)

    def test_pop_on_an_empty_stack_raises(self) -> None:
        with self.assertRaises(IndexError):
            self.stack.pop()

    def test_peek_does_not_remove_the_item(self) -> None:
"""

CODE = [INVENTORY, VECTOR, STACK_TESTS]
WORKLOAD_TEXTS = {"chat": CHAT, "rewrite": REWRITE, "code": CODE}
CHAT_WORKLOADS = ("chat", "rewrite")  # through the chat template; code continues plain text


# --- prompts and the draft model ---


def prompt_ids(tokenizer: Any, text: str, chat: bool) -> list[int]:
    """`text` as one user message through the chat template (when asked and the tokenizer has
    one), else as plain text."""
    if chat and getattr(tokenizer, "chat_template", None):
        messages = [{"role": "user", "content": text}]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return list(tokenizer(text, add_special_tokens=False).input_ids)
    return list(tokenizer(text).input_ids)


def workload_prompts(tokenizer: Any, workloads: list[str]) -> dict[str, list[list[int]]]:
    return {w: [prompt_ids(tokenizer, t, w in CHAT_WORKLOADS) for t in WORKLOAD_TEXTS[w]] for w in workloads}


@dataclass(frozen=True)
class Draft:
    path: Path
    description: str
    layers: int
    params: int


def param_count(model_dir: Path) -> int:
    """Parameters of the checkpoint's model (tied weights once), counted on the meta device."""
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir))
    return sum(p.numel() for p in model.parameters())


def prune(model_dir: Path, layers: int, out: Path) -> int:
    """Saves the model of `model_dir` cut to its first `layers` decoder layers (embeddings, final
    norm and LM head kept), with its tokenizer, to `out`; returns the target's layer count."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype="auto")
    total = model.config.num_hidden_layers
    if not 1 <= layers <= total:
        raise SystemExit(f"--draft-layers: the target has {total} decoder layers, got {layers}")
    decoder = model.get_decoder()
    decoder.layers = decoder.layers[:layers]
    model.config.num_hidden_layers = layers
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = model.config.layer_types[:layers]
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(out)
    return total


def make_draft(args: argparse.Namespace, model_dir: Path, tmp: Path) -> Draft:
    from transformers import AutoConfig

    if args.draft_model:
        path = Path(args.draft_model)
        layers = AutoConfig.from_pretrained(path).num_hidden_layers
        return Draft(path, f"given: {path}", layers, param_count(path))
    path = tmp / "draft"
    total = prune(model_dir, args.draft_layers, path)
    description = f"pruned: the first {args.draft_layers} of {total} decoder layers of {model_dir.name}"
    return Draft(path, description, args.draft_layers, param_count(path))


# --- the workloads ---


@dataclass
class WorkloadRun:
    tok_s: float
    itl_p50_ms: float
    tokens: int
    requests: int
    wall_s: float
    steps: int
    drafts: int  # steps of a sequence that verified proposals
    proposed: int
    accepted: int


def renewed(speculator: Any) -> Any:
    """A speculator like `speculator` that has learnt nothing: new stats and acceptance estimates,
    an empty n-gram index or a draft engine with an empty prefix cache (the draft model shared)."""
    from wicore.worker.draft import DraftProposer
    from wicore.worker.paged_engine import PagedEngine
    from wicore.worker.speculative import NgramProposer, Speculator

    if speculator is None:
        return None
    old = speculator.proposer
    if isinstance(old, DraftProposer):
        engine = old.engine
        fresh = PagedEngine(engine.runner.model, engine.config, engine.fingerprint)
        proposer: Any = DraftProposer(fresh, old.draft_vocab, old.target_vocab)
    else:
        proposer = NgramProposer(speculator.config.ngram_min, speculator.config.ngram_max)
    return Speculator(speculator.config, proposer)


def run_workload(
    engine: Any, prompts: list[list[int]], new: int, batch: int, stop: frozenset[int], tag: str
) -> tuple[WorkloadRun, list[list[int]]]:
    """All of `prompts`, `batch` requests at a time (the next one added as soon as one finishes);
    the figures and each request's tokens."""
    from wicore.worker.engine_types import EngineRequest

    queue = deque(enumerate(prompts))
    index: dict[str, int] = {}
    produced: list[list[int]] = [[] for _ in prompts]
    last: dict[str, float] = {}  # when each request's latest output arrived
    itl: list[float] = []
    before = engine.stats()
    steps = 0
    start = time.perf_counter()
    while queue or engine.has_unfinished():
        while queue and len(engine.seqs) < batch:
            i, ids = queue.popleft()
            index[f"{tag}-{i}"] = i
            engine.add_request(EngineRequest(f"{tag}-{i}", ids, new, stop_token_ids=stop))
        outputs = engine.step()
        now = time.perf_counter()
        steps += 1
        for out in outputs:
            n = len(out.new_token_ids)
            if out.request_id in last and n:
                itl += [(now - last[out.request_id]) / n] * n
            last[out.request_id] = now
            produced[index[out.request_id]] += out.new_token_ids
    wall = time.perf_counter() - start
    after = engine.stats()
    tokens = sum(map(len, produced))
    run = WorkloadRun(
        tok_s=tokens / wall,
        itl_p50_ms=1000 * percentile(itl, 0.5) if itl else float("nan"),
        tokens=tokens,
        requests=len(prompts),
        wall_s=wall,
        steps=steps,
        drafts=after.spec_drafts - before.spec_drafts,
        proposed=after.spec_proposed - before.spec_proposed,
        accepted=after.spec_accepted - before.spec_accepted,
    )
    return run, produced


def cycled(prompts: list[list[int]], batch: int) -> list[list[int]]:
    """The workload's requests: its prompts, repeated cyclically up to `batch` of them."""
    return [prompts[i % len(prompts)] for i in range(max(len(prompts), batch))]


def ratio(numerator: int, denominator: int) -> float | None:
    return numerator / denominator if denominator else None


Runs = dict[str, dict[str, list[WorkloadRun]]]  # method -> workload -> one per run


def table(runs: Runs, value: Callable[[list[WorkloadRun]], Any]) -> dict[str, dict[str, Any]]:
    """`value` of each method's runs on each workload, keyed by method, then workload."""
    return {m: {w: value(rs) for w, rs in by_workload.items()} for m, by_workload in runs.items()}


def summarise(runs: Runs) -> dict[str, Any]:
    """Medians over runs; acceptance and tokens per verifying step over all runs' counts (None
    without proposals)."""
    tok_s = table(runs, lambda rs: statistics.median(r.tok_s for r in rs))
    off = tok_s.get("off")
    return {
        "tok_s": tok_s,
        "itl_p50_ms": table(runs, lambda rs: statistics.median(r.itl_p50_ms for r in rs)),
        "acceptance": table(runs, lambda rs: ratio(sum(r.accepted for r in rs), sum(r.proposed for r in rs))),
        "tokens_per_verify": table(
            runs, lambda rs: ratio(sum(r.accepted + r.drafts for r in rs), sum(r.drafts for r in rs))
        ),
        "speedup": {m: {w: v / off[w] for w, v in by_w.items()} for m, by_w in tok_s.items()} if off else {},
    }


def first_difference(a: list[int], b: list[int]) -> int | None:
    if a == b:
        return None
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


def find_mismatches(outputs: dict[str, dict[str, list[list[list[int]]]]]) -> list[dict[str, Any]]:
    """Every (method, workload, run, request) whose tokens differ from those of off's first run,
    with the index of the first token that differs."""
    if "off" not in outputs:
        return []
    found = []
    for method, by_workload in outputs.items():
        for workload, per_run in by_workload.items():
            reference = outputs["off"][workload][0]
            for run, produced in enumerate(per_run):
                for request, (want, got) in enumerate(zip(reference, produced, strict=True)):
                    first = first_difference(want, got)
                    if first is not None:
                        where = {"method": method, "workload": workload, "run": run, "request": request}
                        found.append(where | {"first_diff": first})
    return found


# --- the cost of verifying positions ---


def decoding(engine: Any, prompts: list[list[int]], reserve: int, tag: str) -> list[Any]:
    """The sequences of `prompts`, prefilled and decoding (one uncomputed token each), with blocks
    for `reserve` positions more, allocated as the scheduler does for proposals."""
    from wicore.worker.engine_types import EngineRequest

    ids = [f"{tag}-{i}" for i in range(len(prompts))]
    for rid, prompt in zip(ids, prompts, strict=True):
        engine.add_request(EngineRequest(rid, prompt, 64))  # room to keep decoding while others prefill
    started: set[str] = set()
    while len(started) < len(ids):
        started.update(out.request_id for out in engine.step())
    seqs = [engine.seqs[rid] for rid in ids]
    for seq in seqs:
        seq.block_ids += engine.pool.allocate(
            seq.blocks_needed(seq.num_computed + 1 + reserve, engine.pool.block_size)
        )
    return seqs


def step_seconds(runner: Any, seqs: list[Any], k: int) -> float:
    """One packed pass in which each sequence computes its next token and k proposals."""
    from wicore.worker.batch_scheduler import ScheduledSeq

    batch = [ScheduledSeq(seq, 1 + k, tuple(seq.token_ids[-k:]) if k else ()) for seq in seqs]
    start = time.perf_counter()
    logits, _ = runner.run(batch)
    if logits.is_cuda:
        torch.cuda.synchronize(logits.device)
    return time.perf_counter() - start


def expected_tokens(alpha: float, k: int) -> float:
    return float(k + 1) if alpha >= 1.0 else (1.0 - alpha ** (k + 1)) / (1.0 - alpha)


def verify_cost(engine: Any, tokenizer: Any, batches: list[int], args: argparse.Namespace) -> dict[str, Any]:
    """Step times with each --verify-k proposals per sequence at each batch size, on one engine."""
    texts = make_prompts(tokenizer, max(batches), args.verify_prompt_tokens, 0)
    prompts = [list(tokenizer(t).input_ids) for t in texts]
    rows: dict[str, Any] = {}
    stops_paying = None
    for b in batches:
        seqs = decoding(engine, prompts[:b], max(args.verify_k), f"verify{b}")
        times: dict[int, list[float]] = {k: [] for k in args.verify_k}
        for k in args.verify_k:
            step_seconds(engine.runner, seqs, k)  # warm-up, per shape
        for _ in range(args.verify_steps):
            for k in args.verify_k:  # interleaved: drift hits every k alike
                times[k].append(step_seconds(engine.runner, seqs, k))
        for seq in seqs:
            engine.abort_request(seq.request_id)  # releases its blocks, the reserved ones too
        ms = {k: 1000 * statistics.median(ts) for k, ts in times.items()}
        cost = {k: (ms[k] / ms[0] - 1) / k for k in args.verify_k if k}
        gain = expected_tokens(args.alpha, 4) / (ms[4] / ms[0])
        rows[str(b)] = {
            "step_ms": {str(k): v for k, v in ms.items()},
            "cost_per_position": {str(k): v for k, v in cost.items()},
            "gain_k4": gain,
        }
        if stops_paying is None and gain < 1.0:
            stops_paying = b
    engine.pool.check_integrity()
    assert engine.pool.num_free == engine.pool.num_blocks, "verify cost leaked blocks"
    return {
        "alpha": args.alpha,
        "expected_tokens_k4": expected_tokens(args.alpha, 4),
        "prompt_tokens": args.verify_prompt_tokens,
        "batches": rows,
        "k4_stops_paying_at_batch": stops_paying,
    }


# --- reporting ---


def print_results(summary: dict[str, Any], methods: list[str], workloads: list[str]) -> None:
    headers = ("workload", "method", "tok/s", "speedup", "ITL p50 ms", "acceptance", "tok/verify")
    rows = [
        (
            w,
            m,
            summary["tok_s"][m][w],
            summary["speedup"].get(m, {}).get(w),
            summary["itl_p50_ms"][m][w],
            summary["acceptance"][m][w],
            summary["tokens_per_verify"][m][w],
        )
        for w in workloads
        for m in methods
    ]
    print(markdown_table(headers, rows))


def print_verify_cost(cost: dict[str, Any]) -> None:
    from wicore.worker.speculative import TOKEN_COST

    print(
        f"\n## verify cost: step ms with k proposals per sequence ({cost['prompt_tokens']}-token contexts)\n"
    )
    ks = list(next(iter(cost["batches"].values()))["step_ms"])
    headers = ["batch", *(f"k={k} ms" for k in ks), *(f"cost/pos k={k}" for k in ks[1:])]
    rows = [
        [b, *r["step_ms"].values(), *r["cost_per_position"].values(), r["gain_k4"]]
        for b, r in cost["batches"].items()
    ]
    print(markdown_table([*headers, f"gain k=4 (a={cost['alpha']})"], rows))
    at = cost["k4_stops_paying_at_batch"]
    print(
        f"TOKEN_COST (speculative.py) = {TOKEN_COST}; k=4 at a={cost['alpha']} expects "
        f"{cost['expected_tokens_k4']:.2f} tokens a step; it stops paying "
        + (f"at batch {at}" if at is not None else "at no batch size measured")
    )


# --- main ---


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--workloads", default=",".join(WORKLOADS))
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--ignore-eos", action="store_true")
    parser.add_argument("--draft-layers", type=int, default=8)
    parser.add_argument("--draft-model", help="a draft model directory instead of the pruned target")
    parser.add_argument("--verify-cost", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--verify-max-batch", type=int, default=16)
    parser.add_argument("--verify-prompt-tokens", type=int, default=128)
    parser.add_argument("--verify-k", default=",".join(map(str, VERIFY_K)), help="proposals per sequence")
    parser.add_argument("--verify-steps", type=int, default=10)
    parser.add_argument("--alpha", type=float, default=0.7, help="acceptance for the verify cost's gain")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    parser.add_argument("--json")
    args = parser.parse_args()
    args.methods = [m for m in args.methods.split(",") if m]
    args.workloads = [w for w in args.workloads.split(",") if w]
    if not args.methods or set(args.methods) - set(METHODS):
        parser.error(f"--methods: a comma-separated subset of {','.join(METHODS)}")
    if not args.workloads or set(args.workloads) - set(WORKLOADS):
        parser.error(f"--workloads: a comma-separated subset of {','.join(WORKLOADS)}")
    if min(args.new_tokens, args.batch, args.runs, args.verify_max_batch, args.verify_steps) < 1:
        parser.error("--new-tokens, --batch, --runs, --verify-max-batch, --verify-steps: must be >= 1")
    try:
        args.verify_k = sorted({int(k) for k in args.verify_k.split(",") if k})
    except ValueError:
        parser.error(f"--verify-k: expected comma-separated integers, got {args.verify_k!r}")
    if not {0, 4} <= set(args.verify_k) or min(args.verify_k) < 0:
        parser.error("--verify-k: comma-separated proposal counts >= 0, 0 and 4 among them")
    if not 0.0 <= args.alpha < 1.0:
        parser.error("--alpha: must be in [0, 1)")
    return args


def measure(
    args: argparse.Namespace,
    loaded: Any,
    base: dict[str, Any],
    prompts: dict[str, list[list[int]]],
    stop: frozenset[int],
    draft: Draft | None,
) -> tuple[Runs, dict[str, dict[str, list[list[list[int]]]]]]:
    """Every method on every workload, --runs times: the figures and the tokens of each run."""
    from wicore.config import load_config
    from wicore.worker.app import engine_config, make_speculator
    from wicore.worker.paged_engine import PagedEngine

    speculators = {}
    for method in args.methods:
        spec: dict[str, Any] = {"worker.speculative.method": method}
        if draft is not None and method == "draft":
            spec["worker.speculative.draft_model"] = str(draft.path)
        speculators[method] = make_speculator(load_config(None, {}, base | spec), loaded)
    config = load_config(None, {}, base)
    warm_up = prompt_ids(loaded.tokenizer, WARM_UP, chat=False)
    runs: Runs = {m: {w: [] for w in args.workloads} for m in args.methods}
    outputs: dict[str, dict[str, list[list[list[int]]]]] = {
        m: {w: [] for w in args.workloads} for m in args.methods
    }
    for run in range(args.runs):
        for method in args.methods:  # interleaved: drift during the benchmark hits every method alike
            for workload in args.workloads:
                engine = PagedEngine(
                    loaded.model,
                    engine_config(config, loaded.model),
                    loaded.fingerprint,
                    renewed(speculators[method]),
                )
                run_workload(engine, [warm_up], 8, 1, stop, "warm")
                requests = cycled(prompts[workload], args.batch)
                result, produced = run_workload(
                    engine, requests, args.new_tokens, args.batch, stop, f"r{run}"
                )
                runs[method][workload].append(result)
                outputs[method][workload].append(produced)
                print(f"run {run} {method} {workload}: {result}", file=sys.stderr)
    return runs, outputs


def main() -> int:
    args = parse_args()

    from wicore.config import load_config
    from wicore.worker.app import engine_config, load_model
    from wicore.worker.convert import ModelDefaults
    from wicore.worker.paged_engine import PagedEngine

    model_dir = resolve_model_dir(args.model)
    base = {"worker.model": str(model_dir)} | parse_settings(args.set)
    config = load_config(None, {}, base)
    loaded = load_model(config)
    tokenizer = loaded.tokenizer
    prompts = workload_prompts(tokenizer, args.workloads)
    eos = ModelDefaults.from_model(loaded.model, args.new_tokens).eos_token_ids
    stop = frozenset() if args.ignore_eos else eos
    params = {"target": param_count(model_dir)}
    with tempfile.TemporaryDirectory() as tmp:
        draft = make_draft(args, model_dir, Path(tmp)) if "draft" in args.methods else None
        if draft is not None:
            params["draft"] = draft.params
        runs, outputs = measure(args, loaded, base, prompts, stop, draft)

    summary = summarise(runs)
    mismatches = find_mismatches(outputs)
    print(
        f"\n## speculative decoding, {args.model}, batch {args.batch}, up to {args.new_tokens} new tokens, "
        f"medians of {args.runs} runs, {torch.get_num_threads()} threads\n"
    )
    print(f"target: {params['target'] / 1e6:.1f}M parameters")
    if draft is not None:
        print(f"draft: {draft.description} ({draft.params / 1e6:.1f}M parameters)")
    print()
    print_results(summary, args.methods, args.workloads)
    if "off" in args.methods:
        print(f"mismatches against off: {len(mismatches)}" + (f" {mismatches}" if mismatches else ""))

    cost = None
    if args.verify_cost:
        batches = [b for b in (1, 2, 4, 8, 16, 32, 64) if b <= args.verify_max_batch]
        engine = PagedEngine(loaded.model, engine_config(config, loaded.model), loaded.fingerprint)
        cost = verify_cost(engine, tokenizer, batches, args)
        print_verify_cost(cost)

    machine_params = {"threads": torch.get_num_threads(), "torch": torch.__version__, "machine": machine()}
    write_json(
        args.json,
        {
            "benchmark": "spec_bench",
            "params": vars(args) | machine_params | {"parameters": params},
            "draft": None if draft is None else asdict(draft),
            **summary,
            "mismatches": len(mismatches) if "off" in args.methods else None,
            "mismatch_details": mismatches,
            "runs": {m: {w: [asdict(r) for r in rs] for w, rs in by_w.items()} for m, by_w in runs.items()},
            "verify_cost": cost,
        },
    )
    return 1 if mismatches else 0


if __name__ == "__main__":
    sys.exit(main())
