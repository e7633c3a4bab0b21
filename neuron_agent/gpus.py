"""GPU discovery through NVML, and virtual devices for nodes without one.

A node without GPUs is valid: it serves CPU models. A configured memory budget per device caps a
real GPU, or — on a node without GPUs — stands for a virtual device of that size whose "used"
memory is what the models placed on it hold (tests stage fleets of different VRAM tiers so).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from cortex.neuron_api import GpuInfo

log = logging.getLogger("cortex.neuron.gpus")
MIB = 1024 * 1024


@dataclass(frozen=True)
class PhysicalGpu:
    index: int
    uuid: str
    name: str
    total: int
    used: int
    processes: tuple[tuple[int, int], ...]  # (pid, bytes)


_nvml_state: list[bool] = []  # [initialised?] once tried: NVML is initialised once per process


def _nvml_ready() -> bool:
    if not _nvml_state:
        try:
            import pynvml

            pynvml.nvmlInit()
            _nvml_state.append(True)
        except ImportError:
            _nvml_state.append(False)
        except Exception as error:  # pynvml.NVMLError: no driver, no device
            log.info("no NVIDIA GPU here (%s): this node serves CPU models", error)
            _nvml_state.append(False)
    return _nvml_state[0]


def read_nvml() -> list[PhysicalGpu]:
    """Every GPU NVML sees now; [] when there is no driver or no device."""
    if not _nvml_ready():
        return []
    import pynvml

    try:
        gpus = []
        for index in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
            try:
                running = pynvml.nvmlDeviceGetComputeRunningProcesses(handle)
                processes = tuple((p.pid, int(p.usedGpuMemory or 0)) for p in running)
            except pynvml.NVMLError:
                processes = ()
            name = pynvml.nvmlDeviceGetName(handle)
            uuid = pynvml.nvmlDeviceGetUUID(handle)
            gpus.append(
                PhysicalGpu(
                    index=index,
                    uuid=uuid.decode() if isinstance(uuid, bytes) else uuid,
                    name=name.decode() if isinstance(name, bytes) else name,
                    total=int(memory.total),
                    used=int(memory.used),
                    processes=processes,
                )
            )
        return gpus
    except pynvml.NVMLError as error:
        log.warning("NVML read failed: %s", error)
        return []


class DeviceInventory:
    """The node's devices as the lifecycle API reports them."""

    def __init__(self, node_name: str, budgets_mib: tuple[int, ...]) -> None:
        self.node_name = node_name
        self.budgets = [b * MIB for b in budgets_mib]
        self.has_gpu = bool(read_nvml())

    def physical(self) -> list[PhysicalGpu]:
        """One NVML read of every real device (none on a node without GPUs)."""
        return read_nvml() if self.has_gpu else []

    def snapshot(
        self, held_by_device: dict[int, int], physical: list[PhysicalGpu] | None = None
    ) -> list[GpuInfo]:
        """`held_by_device`: bytes the loaded models hold per device index (virtual devices);
        `physical`: a read already made for this report."""
        physical = self.physical() if physical is None else physical
        if physical:
            return [self._real(gpu, held_by_device) for gpu in physical]
        return [
            GpuInfo(
                index=index,
                uuid=f"virtual-{self.node_name}-{index}",
                name=f"virtual device ({budget // MIB} MiB budget)",
                memory_total_bytes=budget,
                memory_used_bytes=min(budget, held_by_device.get(index, 0)),
                memory_free_bytes=max(0, budget - held_by_device.get(index, 0)),
                virtual=True,
            )
            for index, budget in enumerate(self.budgets)
        ]

    def _real(self, gpu: PhysicalGpu, held_by_device: dict[int, int]) -> GpuInfo:
        total = gpu.total
        if gpu.index < len(self.budgets):
            total = min(total, self.budgets[gpu.index])
        used = min(total, max(gpu.used, held_by_device.get(gpu.index, 0)))
        return GpuInfo(
            index=gpu.index,
            uuid=gpu.uuid,
            name=gpu.name,
            memory_total_bytes=total,
            memory_used_bytes=used,
            memory_free_bytes=max(0, total - used),
            processes=[{"pid": pid, "bytes": used_bytes} for pid, used_bytes in gpu.processes],
        )

    def used_on(self, index: int, physical: list[PhysicalGpu] | None = None) -> int | None:
        """NVML's used bytes on a real device (now, or in a read already made); None on
        virtual devices."""
        for gpu in self.physical() if physical is None else physical:
            if gpu.index == index:
                return gpu.used
        return None
