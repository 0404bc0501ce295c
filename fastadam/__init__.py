"""fastadam: fused Adam/AdamW optimizer updates for NumPy arrays (and PyTorch on the CPU).

The public surface::

    adam_step(param, grad, exp_avg, exp_avg_sq, *, step, lr, ...)   # one fused update
    adam_step_multi(params, grads, exp_avgs, exp_avg_sqs, *, step, lr, ...)  # a list of tensors
    MultiTensorPlan(params, grads, exp_avgs, exp_avg_sqs).step(...)  # validated once
    unscale_and_check(grads, scale)                                 # loss-scaling helper
    Adam, AdamW                                                     # optimizers
    FlatParams                                                      # one buffer per model
    available_backends(), auto_backend(), set_num_threads(), get_num_threads()

Backends: ``"numpy"`` (the reference), ``"numba"`` and ``"c"``; ``"auto"`` uses
the fastest that loads, or ``FASTADAM_BACKEND``. A backend that cannot load
never breaks ``import fastadam``; asking for it by name says why.
"""

from __future__ import annotations

from .backends import (
    BACKEND_NAMES,
    BackendUnavailableError,
    auto_backend,
    available_backends,
    get_num_threads,
    set_num_threads,
    unavailable_reasons,
)
from .flat import FlatParams
from .functional import adam_step, unscale_and_check
from .multi import MultiTensorPlan, adam_step_multi
from .optim import Adam, AdamW


def _version() -> str:
    """The installed distribution's version: pyproject.toml is its one source.

    A source tree imported without any install of fastadam has no metadata;
    "0+unknown" (a valid PEP 440 version) says so rather than
    guessing.
    """
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("fastadam")
    except PackageNotFoundError:
        return "0+unknown"


__version__ = _version()

__all__ = [
    "BACKEND_NAMES",
    "Adam",
    "AdamW",
    "BackendUnavailableError",
    "FlatParams",
    "MultiTensorPlan",
    "adam_step",
    "adam_step_multi",
    "auto_backend",
    "available_backends",
    "get_num_threads",
    "set_num_threads",
    "unavailable_reasons",
    "unscale_and_check",
]
