"""The stress test's verdict (benchmark/stress_test.py) on handmade sample series, and its ramp."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmark"))

import stress_test
from stress_test import judge, metric_by_label, ramp_schedule

MIB = 1 << 20
SERVICES = {"gateway": 101, "scheduler": 102, "tier": 103, "worker-0": 104}


def service(
    pid: int | None, rss_mib: float, fds: int = 40, threads: int = 12, **extra: Any
) -> dict[str, Any]:
    return {"pid": pid, "up": True, "start_time": 1000.0 + (pid or 0), "rss_bytes": int(rss_mib * MIB),
            "open_fds": fds, "threads": threads, "cpu_s": 1.0, **extra}  # fmt: skip


def series(
    n: int = 10,
    rss: dict[str, list[float]] | None = None,
    fds: dict[str, list[int]] | None = None,
    errors: dict[str, int] | None = None,
    baseline: int = 4,
) -> list[dict[str, Any]]:
    """`n` samples a second apart, the baseline at index `baseline`, the end last; every service at
    200 MiB and 40 fds unless `rss` / `fds` say otherwise (one value per sample)."""
    samples = []
    for i in range(n):
        services = {}
        for name, pid in SERVICES.items():
            extra = {"running": 0, "waiting": 0, "kv_cache_usage": 0.1} if name.startswith("worker") else {}
            services[name] = service(
                pid, (rss or {}).get(name, [200.0] * n)[i], (fds or {}).get(name, [40] * n)[i], **extra
            )
        sample: dict[str, Any] = {
            "t": float(i),
            "services": services,
            "client": {"completed": 10 * i + 1, "errors": dict(errors or {}) if i == n - 1 else {}},
        }
        if i == baseline:
            sample["label"] = "baseline"
        if i == n - 1:
            sample["label"] = "end"
        samples.append(sample)
    return samples


def test_flat_memory_passes() -> None:
    verdict = judge(series(), rss_growth_limit_mib=64, fd_growth_limit=0)
    assert verdict.passed, verdict.reasons
    assert verdict.reasons == []
    assert set(verdict.services) == set(SERVICES)
    row = verdict.services["worker-0"]
    assert row["rss_growth_mib"] == 0 and row["fds_baseline"] == row["fds_end"] == 40
    assert row["threads_baseline"] == row["threads_end"] == 12


def test_growth_before_the_baseline_and_within_the_bound_passes() -> None:
    # Start-up and warm-up growth (before the baseline) is not judged; 60 MiB after it is within 64.
    rss = [100.0, 300.0, 500.0, 700.0, 700.0, 710.0, 720.0, 740.0, 800.0, 760.0]
    verdict = judge(series(rss={"worker-0": rss}), rss_growth_limit_mib=64)
    assert verdict.passed, verdict.reasons
    row = verdict.services["worker-0"]
    assert row["rss_baseline_mib"] == 700 and row["rss_end_mib"] == 760
    assert row["rss_max_mib"] == 800 and row["rss_growth_mib"] == pytest.approx(60)


def test_rss_growth_above_the_limit_fails_naming_the_service() -> None:
    rss = [200.0] * 5 + [220.0, 240.0, 260.0, 280.0, 300.0]  # +100 MiB after the baseline
    verdict = judge(series(rss={"tier": rss}), rss_growth_limit_mib=64)
    assert not verdict.passed
    assert len(verdict.reasons) == 1
    assert verdict.reasons[0].startswith("tier: RSS grew 100.0 MiB")
    assert "64 MiB" in verdict.reasons[0]
    assert verdict.services["tier"]["rss_growth_mib"] == pytest.approx(100)
    assert judge(series(rss={"tier": rss}), rss_growth_limit_mib=128).passed


def test_a_pool_that_grows_to_a_plateau_passes_a_steady_leak_does_not() -> None:
    """A connection pool reaching the peak of its use after the baseline is a step, then flat; a
    leak keeps growing through the second half of the window too."""
    plateau = [40, 40, 40, 40, 40, 41, 42, 42, 42, 42]  # baseline at 4 (t=4), end t=9, middle t=6.5
    verdict = judge(series(fds={"scheduler": plateau}))
    assert verdict.passed, verdict.reasons
    assert verdict.services["scheduler"]["fds_growth"] == 2
    assert verdict.services["scheduler"]["fds_first_half_max"] == 42
    late = [40, 40, 40, 40, 40, 40, 40, 40, 41, 41]  # grew only in the second half: judged
    assert not judge(series(fds={"scheduler": late})).passed


def test_the_tiers_cached_blocks_are_not_a_leak() -> None:
    """The tier's RSS grows with the blocks its CPU tier holds (bounded by its capacity): that part
    of the growth is subtracted; what is left is judged."""
    rss = [300.0] * 5 + [350.0, 400.0, 450.0, 500.0, 550.0]  # +250 MiB after the baseline
    samples = series(rss={"tier": rss})
    for i, sample in enumerate(samples):
        sample["services"]["tier"]["tier_used_bytes"] = {"cpu": max(0, i - 4) * 50 * MIB, "nvme": 0}
    verdict = judge(samples, rss_growth_limit_mib=64)
    assert verdict.passed, verdict.reasons
    assert verdict.services["tier"]["cache_growth_mib"] == pytest.approx(250)
    samples[-1]["services"]["tier"]["rss_bytes"] = 700 * MIB  # 150 MiB more than its blocks
    reasons = judge(samples, rss_growth_limit_mib=64).reasons
    assert reasons == [
        "tier: RSS grew 400.0 MiB (300.0 -> 700.0 MiB) from the baseline to the end, 250.0 MiB of it "
        "the blocks its CPU tier holds: 150.0 MiB above the 64 MiB bound"
    ]


def test_an_fd_leak_fails() -> None:
    fds = [40, 41, 42, 43, 44, 45, 46, 47, 48, 49]
    verdict = judge(series(fds={"gateway": fds}), fd_growth_limit=0)
    assert not verdict.passed
    assert verdict.reasons == [
        "gateway: open fds grew by 5 (44 -> 49) from the baseline to the end, and by 3 in the second "
        "half of it, above the bound of 0"
    ]
    assert judge(series(fds={"gateway": fds}), fd_growth_limit=5).passed
    # Where the kinds of descriptor were sampled (a local process), the reason says which grew.
    samples = series(fds={"gateway": fds})
    samples[4]["services"]["gateway"]["fd_kinds"] = {"socket": 20, "pipe": 4, "file": 20}
    samples[-1]["services"]["gateway"]["fd_kinds"] = {"socket": 24, "pipe": 5, "file": 20}
    assert judge(samples).reasons[0].endswith("above the bound of 0: pipe +1, socket +4")
    # Fewer descriptors at the end than at the baseline is fine.
    assert judge(series(fds={"gateway": [40] * 5 + [38] * 5})).passed


def test_a_request_error_fails() -> None:
    verdict = judge(series(errors={"UNAVAILABLE": 2, "DEADLINE_EXCEEDED": 1}))
    assert not verdict.passed
    assert verdict.reasons == ["3 request(s) failed: UNAVAILABLE 2, DEADLINE_EXCEEDED 1"]


def test_no_completed_request_fails() -> None:
    samples = series()
    samples[-1]["client"]["completed"] = 0
    assert judge(samples).reasons == ["no request completed"]


def test_a_changed_pid_fails() -> None:
    samples = series()
    samples[7]["services"]["worker-0"]["pid"] = 999
    verdict = judge(samples)
    assert not verdict.passed
    assert verdict.reasons == ["worker-0: restarted, pid 104 -> 999 at t=7.0 s"]


def test_a_changed_start_time_fails_without_pids() -> None:
    samples = series()
    for s in samples:  # a remote target: identity from /metrics only
        for svc in s["services"].values():
            svc["pid"] = None
    samples[6]["services"]["scheduler"]["start_time"] += 300
    assert judge(samples).reasons == ["scheduler: restarted, its process start time changed at t=6.0 s"]


def test_a_gone_process_fails() -> None:
    samples = series()
    gone = samples[3]["services"]["tier"]
    gone.update(up=False, rss_bytes=None, open_fds=None, threads=None)
    assert judge(samples).reasons == ["tier: process 103 gone at t=3.0 s"]


def test_a_remote_missed_scrape_is_a_note_unless_at_the_end() -> None:
    samples = series()
    for s in samples:
        for svc in s["services"].values():
            svc["pid"] = None
    samples[2]["services"]["gateway"].update(up=False, rss_bytes=None, open_fds=None)
    verdict = judge(samples)
    assert verdict.passed, verdict.reasons
    assert verdict.notes == ["gateway: its /metrics did not answer 1 sample(s) before the end"]
    samples[-1]["services"]["gateway"].update(up=False, rss_bytes=None, open_fds=None)
    assert "gateway: its /metrics did not answer at the end (t=9.0 s)" in judge(samples).reasons


def test_requests_held_by_a_worker_at_the_end_fail() -> None:
    samples = series()
    samples[-1]["services"]["worker-0"]["running"] = 2
    assert judge(samples).reasons == [
        "worker-0: 2 request(s) running and 0 waiting at the end, after the load stopped"
    ]


def test_missing_baseline_fails() -> None:
    samples = series()
    del samples[4]["label"]
    assert "no baseline sample (the run ended before the warm-up did)" in judge(samples).reasons


def test_unmeasured_services_are_noted_not_judged() -> None:
    samples = series()
    for s in samples:
        s["services"]["scheduler"].update(rss_bytes=None, open_fds=None, threads=None)
    verdict = judge(samples)
    assert verdict.passed
    assert "scheduler: RSS not measured at the baseline and the end; growth not judged" in verdict.notes
    assert judge([{**s, "services": {}} for s in samples]).notes == [
        "no service was measured (a remote target: give --metrics NAME=HOST:PORT,...)"
    ]


def test_several_reasons_are_all_given() -> None:
    rss = [200.0] * 5 + [300.0] * 5
    samples = series(rss={"worker-0": rss}, fds={"scheduler": [40] * 9 + [41]}, errors={"INTERNAL": 1})
    reasons = judge(samples).reasons
    assert len(reasons) == 3
    assert reasons[0].startswith("1 request(s) failed")
    assert any(r.startswith("scheduler: open fds grew by 1") for r in reasons)
    assert any(r.startswith("worker-0: RSS grew 100.0 MiB") for r in reasons)


def test_ramp_schedule() -> None:
    assert ramp_schedule(4, 2.0) == [0.0, 0.5, 1.0, 1.5]
    assert ramp_schedule(64, 300.0)[1] == 300 / 64
    assert ramp_schedule(64, 300.0)[-1] == 63 / 64 * 300
    assert ramp_schedule(1, 300.0) == [0.0]
    assert ramp_schedule(3, 0.0) == [0.0, 0.0, 0.0]


def test_the_guide_command_parses() -> None:
    args = stress_test.parse_args(["--max_concurrent", "64", "--duration", "3600", "--ramp_up", "300"])
    assert (args.max_concurrent, args.duration, args.ramp_up) == (64, 3600, 300)
    assert args.warmup == 60 and args.sample_interval == 5
    assert args.rss_growth_limit_mib == 64 and args.fd_growth_limit == 0
    assert args.prompt_lens == [32, 128, 512] and args.output_lens == [16, 64, 128]
    assert stress_test.parse_args(["--duration", "100"]).warmup == 20
    with pytest.raises(SystemExit):
        stress_test.parse_args(["--duration", "10", "--warmup", "10"])
    with pytest.raises(SystemExit):
        stress_test.parse_args(["--prompt_lens", "32,x"])


def test_metric_by_label() -> None:
    scraped = {
        'wicore:tier_used_bytes{codec="raw",tier="cpu"}': 100.0,
        'wicore:tier_used_bytes{codec="q8",tier="cpu"}': 20.0,
        'wicore:tier_used_bytes{codec="raw",tier="nvme"}': 5.0,
        'wicore:tier_used_bytes_other{tier="cpu"}': 1.0,
    }
    assert metric_by_label(scraped, "wicore:tier_used_bytes", "tier") == {"cpu": 120.0, "nvme": 5.0}
    assert metric_by_label(scraped, "wicore:tier_blocks", "tier") == {}


def test_sample_service_reads_a_local_process() -> None:
    me = stress_test.sample_service(os.getpid(), None)
    assert me["up"] and me["pid"] == os.getpid()
    assert me["rss_bytes"] > 0 and me["open_fds"] > 0 and me["threads"] >= 1
    assert "kv_cache_usage" not in me and "tier_used_bytes" not in me
    gone = stress_test.sample_service(2**22 + 12345, None)  # above pid_max: no such process
    assert not gone["up"] and gone["rss_bytes"] is None


def test_plot_draws_every_panel(tmp_path: Path) -> None:
    samples = series()
    for i, s in enumerate(samples):
        s["services"]["tier"]["tier_used_bytes"] = {"cpu": i * MIB}
        s["client"] |= {"in_flight": 4, "loops": 4, "output_tok_s": 100.0 + i}
    args = stress_test.parse_args(["--max_concurrent", "4", "--ramp_up", "2", "--duration", "8"])
    stress_test.plot(str(tmp_path / "out.png"), samples, args)
    assert (tmp_path / "out.png").stat().st_size > 10_000
