"""``fastadam bench``: how close each backend's Adam step comes to the memory roofline.

An Adam step is memory-bound. In float32 it reads θ, g, m, v and writes θ, m, v
back: 7 × 4 = 28 bytes per element (56 in float64), for a handful of flops. So
the yardstick is not a FLOP count but the bandwidth the machine can sustain on
that exact access pattern. This command measures, in order:

1. **the roofline**: a trivial Numba kernel that moves the same bytes as a step
   (``p += g; m += g; v += g*g``: reads four arrays, writes three in place),
   vectorized and parallel over the same thread count, best of several runs at
   the largest size measured (or at every size, ``--roofline-per-size``), per dtype;
2. **each backend at each size**: median seconds per step (after warm-up),
   effective GB/s, fraction of the roofline, speed-up over the NumPy reference
   and over ``torch.optim.Adam(fused=True)`` (when torch is installed; torch's
   ``fused=True`` and ``foreach=True`` optimizers are measured too, over one
   tensor of ``n`` elements that shares the NumPy buffers); with several
   ``--dtype``, each backend's steps of one size alternate in rounds, so the
   ratio of their times (bf16 against float32 states, a project target) is
   measured side by side;
3. **the per-call cost** of a 1,024-element float32 step, validation included,
   as a multiple of ``np.add(p, g, out=p)`` on an array of the same size (timed
   in the same alternating rounds: a ratio travels between machines whose Python
   differs 3x in speed, a µs figure does not); and the cost per tensor of a
   multi-tensor step (:class:`fastadam.MultiTensorPlan` over 256 tensors of
   1,024 elements) beyond one ``adam_step`` over all their elements at once.

``--model gpt2-small,gpt2-mini`` is another mode: a whole model's optimizer
step, fastadam's optimizers against torch's (see :mod:`fastadam.bench_model`).

It then prints a table (``--markdown`` for Markdown), with ``--targets`` checks the
project's speed targets, and optionally writes ``--json`` records and a ``--plot``.

Only the public API is used (:func:`fastadam.adam_step`,
:func:`fastadam.set_num_threads`, ...), so what is measured is what a user gets.

Run ``python -m fastadam bench --help`` or ``fastadam-bench --help``.

The modules: :mod:`~fastadam.bench.cli` (the options; a run is measure, then
report), :mod:`~fastadam.bench.steps` (what is timed), :mod:`~fastadam.bench.timing`,
:mod:`~fastadam.bench.roofline`, :mod:`~fastadam.bench.measure` (the sweep's
records), :mod:`~fastadam.bench.machine` (what the numbers depend on),
:mod:`~fastadam.bench.report` and :mod:`~fastadam.bench.tables` (the output),
:mod:`~fastadam.bench.targets` (``--targets``), :mod:`~fastadam.bench.plot`
(``--plot``). What other code uses is re-exported here.
"""

from __future__ import annotations

from .cli import (
    DEFAULT_SIZES,
    MAX_SIZE,
    BenchError,
    build_parser,
    finish_run,
    main,
    parse_backends,
    parse_dtypes,
    parse_size,
    parse_sizes,
)
from .machine import _cpu_seconds, apply_threads, machine_info, note_others_busy, numba_target
from .measure import Sweep, _record, add_speedups, measure_per_call, measure_sweep
from .plot import write_plot
from .report import header_lines, per_call_table, per_tensor_table, sweep_report, sweep_table
from .roofline import Roofline, measure_roofline, roofline_for
from .steps import (
    ALL_BACKENDS,
    BF16_STATES,
    BNB,
    DTYPES,
    FASTADAM_BACKENDS,
    NP_ADD,
    PER_CALL_N,
    PER_TENSOR_K,
    Q8_STATES,
    TORCH_BACKENDS,
    bytes_per_element,
    make_state,
    make_step,
    state_bytes_per_element,
)
from .tables import _fmt_ratio, format_n, format_seconds, render_table
from .targets import (
    PER_CALL_TARGET_BACKENDS,
    TARGET_BF16_TIME_RATIO,
    TARGET_BF16_TIME_RATIO_AVX2,
    TARGET_IN_CACHE,
    TARGET_LARGE_N,
    TARGET_PER_CALL_RATIO,
    TARGET_PER_TENSOR_RATIO,
    TARGET_ROOFLINE_FRACTION,
    TARGET_SPEEDUP_VS_NUMPY,
    TARGET_SPEEDUP_VS_TORCH_IN_CACHE,
    TARGET_SPEEDUP_VS_TORCH_LARGE,
    bf16_goal,
    evaluate_targets,
    targets_table,
    vector_isas,
)
from .timing import (
    DEFAULT_MIN_TIME,
    INTERLEAVE_ROUNDS,
    MAX_REPEATS,
    MIN_REPEATS,
    time_calls,
    time_interleaved,
)

__all__ = [
    "ALL_BACKENDS",
    "BF16_STATES",
    "BNB",
    "DEFAULT_MIN_TIME",
    "DEFAULT_SIZES",
    "DTYPES",
    "FASTADAM_BACKENDS",
    "INTERLEAVE_ROUNDS",
    "MAX_REPEATS",
    "MAX_SIZE",
    "MIN_REPEATS",
    "NP_ADD",
    "PER_CALL_N",
    "PER_CALL_TARGET_BACKENDS",
    "PER_TENSOR_K",
    "Q8_STATES",
    "TARGET_BF16_TIME_RATIO",
    "TARGET_BF16_TIME_RATIO_AVX2",
    "TARGET_IN_CACHE",
    "TARGET_LARGE_N",
    "TARGET_PER_CALL_RATIO",
    "TARGET_PER_TENSOR_RATIO",
    "TARGET_ROOFLINE_FRACTION",
    "TARGET_SPEEDUP_VS_NUMPY",
    "TARGET_SPEEDUP_VS_TORCH_IN_CACHE",
    "TARGET_SPEEDUP_VS_TORCH_LARGE",
    "TORCH_BACKENDS",
    "BenchError",
    "Roofline",
    "Sweep",
    "_cpu_seconds",
    "_fmt_ratio",
    "_record",
    "add_speedups",
    "apply_threads",
    "build_parser",
    "bytes_per_element",
    "state_bytes_per_element",
    "bf16_goal",
    "evaluate_targets",
    "vector_isas",
    "finish_run",
    "format_n",
    "format_seconds",
    "header_lines",
    "machine_info",
    "main",
    "make_state",
    "make_step",
    "measure_per_call",
    "measure_roofline",
    "measure_sweep",
    "note_others_busy",
    "numba_target",
    "parse_backends",
    "parse_dtypes",
    "parse_size",
    "parse_sizes",
    "per_call_table",
    "per_tensor_table",
    "render_table",
    "roofline_for",
    "sweep_report",
    "sweep_table",
    "targets_table",
    "time_calls",
    "time_interleaved",
    "write_plot",
]
