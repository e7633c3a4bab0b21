"""Device-to-device copy bandwidth (bytes read + written per second): the roofline's denominator."""

from __future__ import annotations

import json

import torch


def measure(size: int = 4 * 2**30, copies: int = 10) -> float:
    """Bytes read + written per second copying `size` bytes on the GPU, `copies` times."""
    source = torch.empty(size, dtype=torch.uint8, device="cuda")
    target = torch.empty_like(source)
    for _ in range(3):
        target.copy_(source)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(copies):
        target.copy_(source)
    end.record()
    torch.cuda.synchronize()
    seconds: float = start.elapsed_time(end) / 1000 / copies
    return 2 * size / seconds


def main() -> None:
    rate = measure()
    print(json.dumps({"device": torch.cuda.get_device_name(), "copy_read_write_bytes_per_s": rate}))


if __name__ == "__main__":
    main()
