"""Which device each stage runs on, and how stages that share a device share its memory.

``--stage-devices 0,0,1,1`` puts stages 0 and 1 on ``cuda:0`` and stages 2 and 3 on ``cuda:1``
(ids after ``CUDA_VISIBLE_DEVICES``); the default is one device per stage, ``0..N-1``. Stages
on one device share it: each may take ``1/k`` of it when ``k`` stages are there, or the
``--gpu-memory-gb`` cap, and the caps of one device must add up to no more than the device
holds. Pure functions; the launcher checks the list against the devices present, a stage sizes
its KV cache with ``stage_memory_cap``.
"""
from __future__ import annotations

from collections import Counter

GiB = 1 << 30


class DeviceListError(ValueError):
    """A bad --stage-devices list, or caps a device cannot hold: one line for the user."""


def parse_stage_devices(text: str) -> tuple[int, ...]:
    """'0,0,1' -> (0, 0, 1); a non-integer or negative entry is an error."""
    out = []
    for item in text.split(","):
        item = item.strip()
        if not item.isdigit():
            raise DeviceListError(f"--stage-devices: {item!r} is not a device id (a list of "
                                  "integers such as 0,0,1)")
        out.append(int(item))
    return tuple(out)


def resolve(stages: int, stage_devices: tuple[int, ...] | None) -> tuple[int, ...]:
    """The device id of every stage: the list given, or 0..stages-1."""
    if stage_devices is None:
        return tuple(range(stages))
    if len(stage_devices) != stages:
        raise DeviceListError(f"--stage-devices lists {len(stage_devices)} devices for "
                              f"{stages} stages (--gpus): give one per stage")
    return tuple(stage_devices)


def check_present(devices: tuple[int, ...], count: int) -> None:
    missing = sorted({d for d in devices if d >= count})
    if missing:
        raise DeviceListError(f"--stage-devices names cuda:{missing[0]} but only {count} CUDA "
                              "device(s) are present")


def sharers(devices: tuple[int, ...]) -> tuple[int, ...]:
    """For each stage, how many stages run on its device (itself included)."""
    n = Counter(devices)
    return tuple(n[d] for d in devices)


def check_caps(devices: tuple[int, ...], memory_gb: float | None,
               totals: dict[int, int]) -> None:
    """With --gpu-memory-gb, the caps of the stages on one device must fit that device."""
    if memory_gb is None:
        return
    for d, k in sorted(Counter(devices).items()):
        if k * memory_gb * GiB > totals[d]:
            raise DeviceListError(
                f"{k} stage(s) on cuda:{d} at --gpu-memory-gb {memory_gb:g} need "
                f"{k * memory_gb:.1f} GiB but the device has {totals[d] / GiB:.1f} GiB")


def stage_memory_cap(total: int, free_at_start: int, num_sharers: int,
                     memory_gb: float | None) -> int:
    """Bytes one stage may use on its device: the --gpu-memory-gb cap, else its share of the
    device: what was free when the stage process started (before its weights), split evenly
    among the stages there. A sibling that loaded first leaves a later stage a smaller share,
    never a larger one, so the stages of one device never ask for more than it had free."""
    if memory_gb is not None:
        return int(memory_gb * GiB)
    return int(min(total, free_at_start) // max(1, num_sharers))
