"""fastadam.config lists every tunable, the C library's compiled-in ones included:
its ``C_*`` constants must be the defaults ``csrc/fastadam.c`` compiles with."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from fastadam import config

FASTADAM_C = Path(__file__).resolve().parent.parent / "csrc" / "fastadam.c"

#: config's name -> the C macro it states.
C_TUNABLES = {
    "C_PARALLEL_MIN_ELEMENTS": "FA_PARALLEL_MIN_ELEMENTS",
    "C_MIN_ELEMENTS_PER_THREAD": "FA_MIN_ELEMENTS_PER_THREAD",
    "C_UNSCALE_PARALLEL_MIN_ELEMENTS": "FA_UNSCALE_PARALLEL_MIN_ELEMENTS",
    "C_UNSCALE_MIN_ELEMENTS_PER_THREAD": "FA_UNSCALE_MIN_ELEMENTS_PER_THREAD",
    "C_MAX_THREADS": "FA_MAX_THREADS",
}


def _c_defines() -> dict[str, int]:
    """Each ``#define NAME <integer>`` of csrc/fastadam.c (``#  define`` included)."""
    if not FASTADAM_C.is_file():
        pytest.skip(f"no C source beside the tests ({FASTADAM_C})")
    pattern = re.compile(r"^#\s*define\s+(FA_\w+)\s+(\d+)\s*(?:/\*.*)?$", re.MULTILINE)
    return {name: int(value) for name, value in pattern.findall(FASTADAM_C.read_text())}


@pytest.mark.parametrize("name", sorted(C_TUNABLES))
def test_config_states_the_c_librarys_defaults(name):
    defines = _c_defines()
    macro = C_TUNABLES[name]
    assert macro in defines, f"csrc/fastadam.c no longer defines {macro}"
    assert getattr(config, name) == defines[macro], (
        f"config.{name} = {getattr(config, name)}, csrc/fastadam.c: {macro} {defines[macro]}"
    )


def test_every_c_threshold_of_the_source_is_in_config():
    """A new FA_*_ELEMENTS* or FA_*_THREADS tunable in the C source needs its line here."""
    tunables = {n for n in _c_defines() if re.search(r"ELEMENTS|THREADS", n)}
    assert tunables == set(C_TUNABLES.values())


def test_the_c_backend_clamps_to_configs_cap():
    import fastadam

    if "c" not in fastadam.available_backends():
        pytest.skip(fastadam.unavailable_reasons().get("c", "C backend unavailable"))
    from fastadam.backends import c

    before = c.get_num_threads()
    try:
        c.set_num_threads(config.C_MAX_THREADS + 1)  # accepted, clamped
        assert c.get_num_threads() in (1, config.C_MAX_THREADS)  # 1: built without OpenMP
    finally:
        c.set_num_threads(before)
