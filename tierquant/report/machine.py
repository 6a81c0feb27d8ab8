"""machine stage: what this machine is, in a file that changes only when the machine does.

`data/machine.json` names the OS, chip/CPU, memory, MLX and mlx-lm versions and the
MLX backend. The benchmarks depend on it, so DVC reruns them on another machine (or
after an MLX upgrade) and keeps their cached results otherwise. It holds nothing that
varies between runs on one machine: no timestamps, no free memory, no measured speeds
(the benchmark stage measures memory bandwidth itself).
"""

from __future__ import annotations

import logging
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

from tierquant.core.files import atomic_output, json_bytes
from tierquant.plan.size import GIB

log = logging.getLogger(__name__)

# mx.device_info() keys that describe the hardware (anything else could be dynamic).
DEVICE_KEYS = (
    "architecture",
    "device_name",
    "memory_size",
    "max_recommended_working_set_size",
    "max_buffer_length",
)


def _sysctl(name: str) -> str | None:
    try:
        out = subprocess.run(["sysctl", "-n", name], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() or None


def _linux_cpu_name() -> str | None:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.lower().startswith(("model name", "hardware")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        return None
    return None


def _memory_bytes() -> int | None:
    if sys.platform == "darwin":
        value = _sysctl("hw.memsize")
        return int(value) if value and value.isdigit() else None
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def _os_version() -> str:
    if sys.platform == "darwin":
        return f"macOS {platform.mac_ver()[0]}"
    try:
        return platform.freedesktop_os_release().get("PRETTY_NAME", platform.system())
    except OSError:
        return platform.system()


def backend() -> str:
    """The MLX backend arrays run on: "metal", "cuda" or "cpu"."""
    import mlx.core as mx

    if mx.metal.is_available():
        return "metal"
    cuda = getattr(mx, "cuda", None)
    if cuda is not None and cuda.is_available():
        return "cuda"
    return "cpu"


def machine_info() -> dict[str, Any]:
    """The machine, its MLX stack and backend; identical on every call on one machine.

    Memory is rounded to whole GiB (the kernel's reserved share can move by megabytes
    across boots of the same machine).
    """
    from importlib.metadata import version

    import mlx.core as mx

    cpu = _sysctl("machdep.cpu.brand_string") if sys.platform == "darwin" else _linux_cpu_name()
    memory = _memory_bytes()
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    info: dict[str, Any] = {
        "os": f"{platform.system()} {platform.release()}",
        "os_version": _os_version(),
        "arch": platform.machine(),
        "cpu": cpu or platform.processor() or "unknown",
        "cpu_count": os.cpu_count(),
        "usable_cpus": usable,
        "memory_gib": round(memory / GIB) if memory else None,
        "python": platform.python_version(),
        "mlx": version("mlx"),
        "mlx_lm": version("mlx-lm"),
        "backend": backend(),
        "device": {k: v for k, v in sorted(mx.device_info().items()) if k in DEVICE_KEYS},
    }
    if sys.platform == "darwin":
        # 0 = macOS's default GPU wired limit; raised with `sudo sysctl iogpu.wired_limit_mb=N`.
        limit = _sysctl("iogpu.wired_limit_mb")
        info["gpu_wired_limit_mb"] = int(limit) if limit and limit.isdigit() else None
    return info


def write_machine(out: Path) -> Path:
    """The machine stage: write `machine_info()` to `out` (a fresh file, renamed into place)."""
    out = Path(out)
    info = machine_info()
    with atomic_output(out, is_dir=False) as tmp:
        tmp.write_bytes(json_bytes(info))
    log.info(
        "wrote %s: %s, %s, mlx %s (%s)", out, info["os"], info["cpu"], info["mlx"], info["backend"]
    )
    return out
