"""Plots and tables of a schedule's lr and momentum over steps.

Values come from the host evaluation in ``schedule.py`` (the specification
every backend reproduces on the device), so a plot shows exactly what the
optimizer will use: step ``k`` is the step that runs after ``k`` applied steps.
Each function takes a schedule object or a DeepSpeed config (a dict or a
JSON file path, as :func:`~onecycle_fused.schedule_from_config`).
"""
from __future__ import annotations

import numbers
from collections.abc import Iterable
from typing import Optional, Sequence

from .schedule import OneCycle, TorchOneCycle, _Schedule, schedule_from_config

__all__ = ["schedule_values_at", "format_table", "plot_schedule", "default_steps"]


def image_target(path, name: str = "path") -> tuple[str, str]:
    """``(path, format)`` for saving a figure at exactly ``path``: the format
    from its extension (``.png``, ``.svg``, ``.pdf``...), PNG when it has none
    (matplotlib would otherwise write ``path + ".png"``). Raises ValueError
    naming ``name`` for an unknown extension or a directory that does not
    exist, so that a long run is not lost to a typo at the end."""
    import os

    try:
        from matplotlib.backend_bases import FigureCanvasBase
    except ImportError as e:  # an optional dependency: say how to get it, before any work
        raise ImportError(f"{name}: drawing an image needs matplotlib: pip install matplotlib "
                          "(or onecycle-fused[plot])") from e

    if not isinstance(path, (str, os.PathLike)):  # (os.fspath's TypeError named no argument)
        raise ValueError(f"{name} must be a file path, got {path!r}")
    path = os.fspath(path)
    if not isinstance(path, str) or not path:
        raise ValueError(f"{name} must be a file path, got {path!r}")
    folder = os.path.dirname(path)
    if folder and not os.path.isdir(folder):
        raise ValueError(f"{name}: directory {folder!r} does not exist")
    if os.path.isdir(path):
        raise ValueError(f"{name}: {path!r} is a directory, give a file path")
    ext = os.path.splitext(path)[1][1:].lower()
    formats = FigureCanvasBase.get_supported_filetypes()
    if ext and ext not in formats:
        raise ValueError(f"{name}: unknown image format {ext!r} (use one of {sorted(formats)})")
    fmt = ext or "png"
    if fmt not in _WRITABLE:
        # a format matplotlib lists may still need a tool this machine lacks
        # (pgf: LaTeX, to lay out text): a figure with a line of text written
        # to memory first (once per format, ~0.2 s), not the real one after
        # a long run
        import io

        from matplotlib.figure import Figure

        try:
            probe = Figure(figsize=(1, 1))
            probe.text(0.5, 0.5, "lr")
            probe.savefig(io.BytesIO(), format=fmt)
        except Exception as e:  # (RuntimeError "xelatex not found", an OSError...)
            raise ValueError(f"{name}: {fmt!r} images cannot be written here ({type(e).__name__}: {e}); "
                             "use .png, .svg or .pdf") from None
        _WRITABLE.add(fmt)
    return path, fmt


_WRITABLE: set[str] = set()  # formats image_target has written once in this process


def _as_schedule(schedule) -> _Schedule:
    """A schedule object as is; a DeepSpeed config (dict or JSON path) built."""
    return schedule if isinstance(schedule, _Schedule) else schedule_from_config(schedule)


def default_steps(schedule: _Schedule) -> int:
    """A step count that shows the whole shape: OneCycle's cycle plus as much
    decay again, TorchOneCycle's whole schedule (at least 1000 steps for a
    range test)."""
    schedule = _as_schedule(schedule)
    if isinstance(schedule, OneCycle):
        return 2 * schedule.total_size + 1
    if isinstance(schedule, TorchOneCycle):
        return schedule.length + 1
    return max(1000, 2 * schedule.lr_range_test_step_size)


def _num_groups(schedule: _Schedule) -> int:
    return schedule.num_groups or 1


def schedule_values_at(schedule: _Schedule, steps: Sequence[int]) -> list[dict]:
    """One row per step: ``{"step": k, "lr": [...], "momentum": [...] or None}``
    (one value per parameter group)."""
    schedule = _as_schedule(schedule)
    rows = []
    for k in steps:
        lrs = [schedule.lr(k, g) for g in range(_num_groups(schedule))]
        moms = [schedule.momentum(k, g) for g in range(_num_groups(schedule))]
        rows.append({"step": int(k), "lr": lrs, "momentum": None if moms[0] is None else moms})
    return rows


def format_table(rows: list[dict]) -> str:
    """A plain-text table of :func:`schedule_values_at` rows."""
    groups = len(rows[0]["lr"]) if rows else 1
    has_mom = bool(rows) and rows[0]["momentum"] is not None

    def names(base):
        return [base] if groups == 1 else [f"{base}[{g}]" for g in range(groups)]

    header = ["step"] + names("lr") + (names("momentum") if has_mom else [])
    lines = []
    for r in rows:
        cells = [str(r["step"])] + [f"{v:.6g}" for v in r["lr"]]
        if has_mom:
            cells += [f"{v:.6g}" for v in r["momentum"]]
        lines.append(cells)
    widths = [max(len(h), *(len(c[i]) for c in lines)) if lines else len(h) for i, h in enumerate(header)]
    out = ["  ".join(h.rjust(w) for h, w in zip(header, widths))]
    out += ["  ".join(c.rjust(w) for c, w in zip(cells, widths)) for cells in lines]
    return "\n".join(out)


def plot_schedule(
    schedule: _Schedule,
    path: str,
    steps: Optional[int] = None,
    marks: Sequence[int] = (),
    title: Optional[str] = None,
) -> str:
    """Draw lr (top) and momentum (bottom, when the schedule sets it) over
    ``steps`` steps (default :func:`default_steps`) to an image at ``path``
    (PNG, or the format of its extension: ``.svg``, ``.pdf``...).
    ``marks``: steps to highlight with a dot on each curve."""
    schedule = _as_schedule(schedule)
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    n = default_steps(schedule) if steps is None else steps
    # numpy's integers too (np.int64 from a computed count), as lr(k) takes them
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    n = int(n)
    given = marks
    iterable = isinstance(marks, Iterable) and not isinstance(marks, (str, bytes))
    marks = list(marks) if iterable else []  # (an iterator too: read once)
    if not iterable or not all(isinstance(k, numbers.Integral) and not isinstance(k, bool) for k in marks):
        raise ValueError(f"marks must be a sequence of integer steps, got {given!r}")
    path, fmt = image_target(path)
    ks = list(range(n))
    rows = schedule_values_at(schedule, ks)
    has_mom = rows[0]["momentum"] is not None
    fig, axes = plt.subplots(2 if has_mom else 1, 1, figsize=(8, 5.5 if has_mom else 3.2), sharex=True, squeeze=False)
    axes = axes[:, 0]
    groups = len(rows[0]["lr"])
    marks = [k for k in marks if 0 <= k < n]
    mark_rows = schedule_values_at(schedule, marks)
    series = [("lr", "learning rate")] + ([("momentum", "momentum / beta1")] if has_mom else [])
    for ax, (key, label) in zip(axes, series):
        for g in range(groups):
            name = label if groups == 1 else f"group {g}"
            ax.plot(ks, [r[key][g] for r in rows], color=f"C{g}", linewidth=1.5, label=name)
            if marks:
                ax.plot(marks, [r[key][g] for r in mark_rows], "o", color=f"C{g}", markersize=4)
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
        if groups > 1:
            ax.legend(fontsize="small")
    axes[-1].set_xlabel("step (optimizer steps applied)")
    axes[0].set_title(title or f"{type(schedule).__name__} schedule")
    fig.tight_layout()
    fig.savefig(path, dpi=100, format=fmt)
    plt.close(fig)
    return path
