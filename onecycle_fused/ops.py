"""Python side of the compiled custom ops (namespace ``onecycle_fused``).

Loads the compiled libraries and registers the fake (meta) kernels that let
``torch.compile`` / FakeTensor trace the ops. A library that is missing or
fails to load is logged once and never breaks ``import onecycle_fused``: the
optimizers then fall back to another backend.

Ops (schemas in ``csrc/ops.cpp``)::

    sgd_step_(params, grads, momentum_buffers, steps, group_ids, table, counter, grad_scale?, found_inf?)
    adam_step_(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, group_ids, table, counter,
               grad_scale?, found_inf?)
    schedule_values(table, k) -> [groups, 2] float64 (lr, momentum) after k steps (debug / tests)
    cpu_capability() -> which CPU kernels run: "DEFAULT" | "AVX2" | "AVX512", or
        "AVX2/AVX512" (float32-float64 / bfloat16-float16 variants)
    step_planned_(StepPlan plan, table, counter, grad_scale?, found_inf?) -> bool: one device's step
        through a cached plan (class ``torch.classes.onecycle_fused.StepPlan``, see
        ``onecycle_fused/step_plan.py``); False, changing nothing, when the plan no longer fits.
        Eager only: no fake kernel, never traced (the optimizer uses the list ops under compile).
        The optimizer calls the same code as the plan's method, ``plan.step(table, counter,
        grad_scale, found_inf)``, which skips torch.ops' argument checks (see step_plan.run_planned).

An empty tensor in ``momentum_buffers`` / ``max_exp_avg_sqs`` means "this
parameter has none". Both step ops advance every ``steps[i]`` and ``counter``
once, unless ``found_inf`` is non-zero: then nothing changes at all.
"""
from __future__ import annotations

import importlib.util
import logging

import torch

log = logging.getLogger("onecycle_fused")

_loaded: dict[str, bool] = {}
_problems: dict[str, str] = {}  # module -> why it is not loaded ("not built", "failed to load: ...")


def _load(module: str) -> bool:
    """Load ``onecycle_fused.<module>`` once; log (once) why it failed."""
    if module in _loaded:
        return _loaded[module]
    ok = False
    try:
        spec = importlib.util.find_spec(f"onecycle_fused.{module}")
        if spec is None or spec.origin is None:
            _problems[module] = "not built"
            log.info("onecycle_fused: %s is not built; its backend is unavailable", module)
        else:
            torch.ops.load_library(spec.origin)
            ok = True
    except Exception as e:  # a stale or ABI-mismatched build must not break the import
        _problems[module] = f"failed to load ({type(e).__name__}: {e})"
        log.warning("onecycle_fused: failed to load %s (%s: %s); its backend is unavailable",
                    module, type(e).__name__, e)
    _loaded[module] = ok
    return ok


def library_problems() -> dict[str, str]:
    """Why each library tried so far did not load: ``{"_C": "not built"}``,
    ``{"_C_cuda": "failed to load (OSError: ...)"}``; empty when all did. A
    library that is merely not built is logged at INFO level only (a CPU-only
    install has no ``_C_cuda``), so warnings quote this instead."""
    return dict(_problems)


def cpu_library_loaded() -> bool:
    """True when the op schemas and the CPU kernels (``_C``) are loaded."""
    return _load("_C")


def cuda_library_loaded() -> bool:
    """True when the CUDA kernels (``_C_cuda``) are loaded (needs ``_C`` too)."""
    return cpu_library_loaded() and _load("_C_cuda")


def c_function(name: str):
    """A function of the ``_C`` module itself, not an op (step_plan.py's
    ``plan_fingerprint``, the triton backend's ``launch_key``); None when
    ``_C`` is not loaded."""
    if not cpu_library_loaded():
        return None
    try:
        from . import _C  # the library loaded above: the same file, now as a module
    except ImportError:
        return None
    return getattr(_C, name, None)


def cpu_capability() -> str | None:
    """Instruction set of the CPU kernels in use ("AVX2", or "AVX2/AVX512" when
    float32/float64 and bfloat16/float16 use different variants), or None when
    ``_C`` is not loaded."""
    return torch.ops.onecycle_fused.cpu_capability() if cpu_library_loaded() else None


def _register_fakes() -> None:
    # The step ops only mutate their inputs; the fakes have nothing to compute.
    @torch.library.register_fake("onecycle_fused::sgd_step_")
    def _sgd_fake(params, grads, momentum_buffers, steps, group_ids, table, counter, grad_scale, found_inf):
        return None

    @torch.library.register_fake("onecycle_fused::adam_step_")
    def _adam_fake(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, group_ids, table, counter,
                   grad_scale, found_inf):
        return None

    @torch.library.register_fake("onecycle_fused::schedule_values")
    def _schedule_values_fake(table, k):
        return table.new_empty((table.shape[0], 2))


if cpu_library_loaded():
    try:
        _register_fakes()
    except Exception as e:  # e.g. a torch without register_fake
        log.warning("onecycle_fused: could not register fake kernels (%s: %s)", type(e).__name__, e)
