"""Where on this node a model goes: pure functions over the devices as reported and the memory
the loaded models hold. A load that won't fit is refused here, with the numbers, before Triton
is asked."""

from __future__ import annotations

from collections.abc import Iterable

from cortex.config import ModelProfile
from cortex.neuron_api import GpuInfo
from neuron_agent.errors import NoRoom

GIB = 2**30


def held_by_device(models: Iterable[tuple[list[int], int, int]]) -> dict[int, int]:
    """Bytes held per device by models given as (devices, estimated bytes, measured bytes): the
    larger of the two, split evenly over a model's devices."""
    held: dict[int, int] = {}
    for devices, estimated, measured in models:
        share = max(estimated, measured) // max(1, len(devices))
        for device in devices:
            held[device] = held.get(device, 0) + share
    return held


def place(
    profile: ModelProfile,
    estimate: int,
    devices: list[GpuInfo],
    wanted: list[int] | None,
    host_available: int,
) -> list[int]:
    """The devices for the model (the emptiest that fit; [] on a node without devices, where
    host memory is what counts), or NoRoom (409) with the numbers."""
    if not devices:
        if estimate > host_available:
            raise NoRoom(
                f"{profile.name} needs about {estimate / GIB:.2f} GiB; "
                f"this node has {host_available / GIB:.2f} GiB of memory available",
                needed_bytes=estimate,
                free_bytes=host_available,
            )
        return []
    share = estimate // profile.tp
    candidates = [d for d in devices if wanted is None or d.index in wanted]
    fitting = sorted(
        (d for d in candidates if d.memory_free_bytes >= share),
        key=lambda d: -d.memory_free_bytes,
    )
    if len(fitting) < profile.tp:
        free = {d.index: d.memory_free_bytes for d in candidates}
        raise NoRoom(
            f"{profile.name} needs {share / GIB:.2f} GiB on each of {profile.tp} device(s); "
            "free per device: " + ", ".join(f"{i}: {b / GIB:.2f} GiB" for i, b in free.items()),
            needed_bytes_per_device=share,
            free_bytes=free,
        )
    return sorted(d.index for d in fitting[: profile.tp])
