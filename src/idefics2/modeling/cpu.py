"""Facts about this CPU that kernel choices and builds depend on: its model, instruction-set flags and cache
size (Linux's /proc and /sys; elsewhere what `platform` knows)."""

from __future__ import annotations

import functools
import platform
from pathlib import Path

import torch


def cpu_description() -> dict[str, str | list[str]]:
    """This CPU's model name, the instruction-set flags that matter to the kernels here, torch's instruction
    set in use, and every flag (for the machine key)."""
    model, flags = platform.processor() or platform.machine(), []
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                name, _, value = line.partition(":")
                if name.strip() == "model name" and model in (platform.processor(), platform.machine()):
                    model = value.strip()
                elif name.strip() in ("flags", "Features") and not flags:
                    flags = value.split()
    except OSError:
        pass
    wanted = ("avx2", "avx512f", "avx512_bf16", "avx512_fp16", "avx512_vnni", "amx_bf16", "amx_int8")
    return {
        "model": model,
        "features": [flag for flag in wanted if flag in flags],
        "flags": sorted(flags),
        "capability": torch.backends.cpu.get_cpu_capability(),
    }


@functools.cache
def last_level_cache_bytes() -> int | None:
    """The size of the largest CPU cache (Linux's sysfs), or None where it is not known."""
    sizes = []
    for index in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            text = (index / "size").read_text().strip()
        except OSError:
            continue
        units = {"K": 2**10, "M": 2**20, "G": 2**30}
        sizes.append(int(text[:-1]) * units[text[-1]] if text[-1] in units else int(text))
    return max(sizes, default=None)
