"""What the numbers depend on: the machine, the libraries, the kernels' variants,
and what other processes took from the cores during the run."""

from __future__ import annotations

import importlib.util
import os
import platform
import sys
from typing import Any

import numpy as np

import fastadam


def _cpu_seconds() -> tuple[float, float] | None:
    """(busy CPU-seconds of the whole machine, CPU-seconds of this process) so far.

    Linux only (``/proc/stat``); None elsewhere. The difference over the run is
    what *other* processes took from the cores being measured.
    """
    import resource

    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()
    except OSError:
        return None
    if not fields or fields[0] != "cpu":
        return None
    ticks = [int(x) for x in fields[1:]]
    idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0)  # idle + iowait
    guest = sum(ticks[8:10])  # already counted in user/nice
    busy = sum(ticks) - idle - guest
    hz = os.sysconf("SC_CLK_TCK")
    me = resource.getrusage(resource.RUSAGE_SELF)
    return busy / hz, me.ru_utime + me.ru_stime


def machine_info(threads: int) -> dict[str, Any]:
    """What the numbers depend on: CPU, cores, threads, library versions, ISA, threading layer."""
    cpu = None
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    cpu = cpu or platform.processor() or platform.machine()
    try:
        usable: int | None = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    import numba

    try:
        layer = numba.threading_layer()
    except ValueError:  # no parallel kernel has run in this process yet
        layer = None
    torch_version = None
    if "torch" in sys.modules:
        torch_version = sys.modules["torch"].__version__
    elif importlib.util.find_spec("torch") is not None:
        torch_version = "installed, not loaded"
    isa = None
    try:
        # Optional extra: the C library says which SIMD variant it dispatched to.
        isa = fastadam.backends.get("c").isa()
    except Exception:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "usable_cores": usable,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "threads": threads,
        "fastadam": fastadam.__version__,
        "numpy": np.__version__,
        "numba": numba.__version__,
        "numba_threading_layer": layer,
        "torch": torch_version,
        "c_isa": isa,
        "numba_target": numba_target(),
        "auto": ", ".join(f"{k} {v}" for k, v in fastadam.backends.auto_choices().items()),
        "backends_unavailable": fastadam.unavailable_reasons(),
    }


#: Feature-name prefixes of AVX-512 and the extensions that come with it.
_AVX512_PREFIXES = ("avx512", "amx", "avxvnni", "avxifma", "avxneconvert", "evex512", "avx10")
#: ... and of AVX and its extensions, for an SSE-only target.
_AVX_PREFIXES = _AVX512_PREFIXES + ("avx", "fma", "f16c", "vaes", "vpclmulqdq", "gfni")


def numba_target_environment(cpu: str = "haswell") -> dict[str, str]:
    """``NUMBA_CPU_NAME`` and ``NUMBA_CPU_FEATURES`` that make Numba compile for
    ``cpu`` with this host's features less every AVX-512 one (``"haswell"``: an
    AVX2 CPU, ``bench/compare_revisions.py --numba-avx2``) or, for ``"x86-64"``,
    less every AVX one (SSE only). Numba reads them when it is imported: set them
    before, or in a subprocess's environment. Imports llvmlite, not Numba."""
    import llvmlite.binding as ll

    off = _AVX_PREFIXES if cpu == "x86-64" else _AVX512_PREFIXES
    flags = [("+" if on and not name.startswith(off) else "-") + name
             for name, on in sorted(ll.get_host_cpu_features().items())]  # fmt: skip
    return {"NUMBA_CPU_NAME": cpu, "NUMBA_CPU_FEATURES": ",".join(flags)}


def numba_target() -> str:
    """The CPU Numba compiles for and the widest vector ISA in its features, e.g.
    ``"znver4 (AVX-512)"``: ``NUMBA_CPU_NAME``/``NUMBA_CPU_FEATURES`` when set,
    else the host's (what the Numba backend's loops are built for)."""
    from ..backends._numba_intrinsics import target_cpu, target_features

    name = target_cpu()
    enabled = target_features()
    for feature, label in (("avx512f", "AVX-512"), ("avx2", "AVX2"), ("neon", "NEON")):
        if feature in enabled:
            return f"{name} ({label})"
    return f"{name} (no AVX2)" if platform.machine().lower() in ("x86_64", "amd64") else name


def note_others_busy(
    info: dict[str, Any], cpu_before: tuple[float, float] | None, wall: float
) -> None:
    """Set ``info["others_busy_cores"]``: how many cores other processes kept busy on
    average over the ``wall`` seconds since ``cpu_before`` (:func:`_cpu_seconds`), where
    the machine says (Linux)."""
    cpu_after = _cpu_seconds()
    if cpu_before is not None and cpu_after is not None:
        others = max(0.0, (cpu_after[0] - cpu_before[0]) - (cpu_after[1] - cpu_before[1]))
        info["others_busy_cores"] = others / wall


def apply_threads(requested: int | None, with_torch: bool) -> int:
    """Set fastadam's thread count to ``requested`` (if given) and torch's to the same
    (if ``with_torch``); return the count."""
    if with_torch:
        import torch
    if requested is not None:
        fastadam.set_num_threads(requested)
    threads = fastadam.get_num_threads()
    if with_torch:
        # Same thread count for torch, or the comparison says nothing.
        torch.set_num_threads(threads)
    return threads
