"""Device-to-device copy bandwidth (bytes read + written per second): the roofline's denominator."""

from __future__ import annotations

import json

import torch


def main() -> None:
    size = 4 * 2**30
    source = torch.empty(size, dtype=torch.uint8, device="cuda")
    target = torch.empty_like(source)
    for _ in range(3):
        target.copy_(source)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        target.copy_(source)
    end.record()
    torch.cuda.synchronize()
    seconds = start.elapsed_time(end) / 1000 / 10
    print(
        json.dumps(
            {
                "device": torch.cuda.get_device_name(),
                "copy_read_write_bytes_per_s": 2 * size / seconds,
            }
        )
    )


if __name__ == "__main__":
    main()
