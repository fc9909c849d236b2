"""`wicore up`'s worker plan: which device and how many threads each worker gets."""

from __future__ import annotations

from wicore.config import load_config
from wicore.launcher import device_list, device_spec, plan_workers


def test_auto_means_every_gpu_plus_one_cpu_worker_or_cpu_alone() -> None:
    assert device_list("auto", gpu_count=2) == ["gpu:0", "gpu:1", "cpu"]
    assert device_list("auto", gpu_count=0) == ["cpu"]
    assert device_list(" cpu, gpu:1 ,", gpu_count=0) == ["cpu", "gpu:1"]


def test_workers_take_devices_in_turn_and_cpu_workers_split_the_cores() -> None:
    assert plan_workers(["gpu:0", "gpu:1", "cpu"], 3, cpus=16, num_threads=0) == [
        ("gpu:0", 0), ("gpu:1", 0), ("cpu", 0),  # one CPU worker keeps torch's default
    ]  # fmt: skip
    assert plan_workers(["cpu"], 2, cpus=2, num_threads=0) == [("cpu", 1), ("cpu", 1)]
    assert plan_workers(["cpu"], 3, cpus=2, num_threads=0) == [("cpu", 1)] * 3  # at least one each
    assert plan_workers(["gpu:0", "cpu"], 4, cpus=8, num_threads=0) == [
        ("gpu:0", 0), ("cpu", 4), ("gpu:0", 0), ("cpu", 4),
    ]  # fmt: skip
    assert plan_workers(["cpu"], 2, cpus=8, num_threads=3) == [("cpu", 3), ("cpu", 3)]  # set: kept


def test_devices_come_from_the_flag_then_worker_device_then_the_guides_target_devices() -> None:
    guide = {"gpu_config.target_devices": ["gpu:0", "gpu:1"]}
    assert device_spec(load_config(), None) == "cpu"  # the default, as before
    assert device_spec(load_config(None, {}, guide), None) == "gpu:0,gpu:1"
    assert device_spec(load_config(None, {}, {**guide, "worker.device": "auto"}), None) == "auto"
    assert device_spec(load_config(None, {}, guide), "cpu") == "cpu"
