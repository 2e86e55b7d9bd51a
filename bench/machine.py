"""What a figure was measured on: the device, the library versions, the date."""

from __future__ import annotations

import datetime
import os
import platform
import resource
import sys
from importlib import metadata

LIBRARIES = ("torch", "diffusers", "transformers", "peft", "accelerate")
"""Packages whose versions go with every figure."""


def library_versions() -> dict[str, str]:
    """Versions of the libraries that matter to the figures, as this interpreter sees them."""
    versions = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "absent"
    return versions


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (or the platform's guess elsewhere)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def describe_device(device: str) -> str:
    """A one-line description of ``device``: the GPU's name, or the CPU model and core count."""
    if device.startswith("cuda"):
        import torch

        return f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda})"
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{cpu_model()}, {cores} cores"


def peak_rss_mib() -> float:
    """This process's peak resident memory so far, in MiB (Linux reports KiB)."""
    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20


def today() -> str:
    """The date figures are stamped with (UTC)."""
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d")
