"""Command line: ``python -m onecycle_fused plot ...`` and ``... range-test ...``.

``plot`` draws lr and momentum of a schedule given as a DeepSpeed JSON config
(``--config ds.json``) or as ``key=value`` arguments (DeepSpeed parameter
names, values in JSON: ``cycle_max_lr=1e-3``, ``cycle_momentum=false``,
``cycle_min_lr=[1e-4,1e-5]``), and prints a table at the ``--at`` steps.

``range-test`` runs the LR range test on a small built-in problem (see
:func:`onecycle_fused.range_test.toy_problem`) and prints the suggested
bounds as a DeepSpeed scheduler config.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Optional, Sequence

from .schedule import _TORCH_NAMES, _TYPES, schedule_from_config

__all__ = ["main", "build_parser"]


def _parse_value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        if text in ("True", "False"):
            return text == "True"
        try:
            # a Python float literal copied from a script (".1", "1.", "inf"),
            # which JSON does not take: the schedule would reject the string
            # '.1' as "must be a real number"
            return float(text)
        except ValueError:
            return text  # left for the schedule's own validation to reject


def _keyword_args(pairs: Sequence[str]) -> dict:
    params = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"schedule arguments are key=value pairs, got {pair!r}")
        if key in params:
            raise ValueError(f"{key} is given twice")
        params[key] = _parse_value(value)
    return params


def _steps_list(text: str) -> list[int]:
    try:
        steps = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--at takes comma-separated integers, got {text!r}") from None
    if not steps:
        raise argparse.ArgumentTypeError(f"--at takes comma-separated integers, got {text!r}")
    if any(s < 0 for s in steps):
        raise argparse.ArgumentTypeError(f"--at steps must be >= 0, got {text!r}")
    return sorted(set(steps))  # one row per step, in order


def _image_path(text: str) -> str:
    """An argparse type for --out: an empty path (an unset shell variable,
    `--out "$OUT"`) is an error in both commands, where `plot` took it as no
    image and `range-test` failed after its checks naming `plot`."""
    if not text:
        raise argparse.ArgumentTypeError("expected an image path; omit --out for no image")
    return text


def _int_in(minimum: int, maximum: int):
    """An argparse type: an integer in [minimum, maximum] (a step count past
    2^62 or a seed past torch's range was an error from deep inside, naming
    no flag)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = minimum - 1
        if not minimum <= value <= maximum:
            raise argparse.ArgumentTypeError(f"expected an integer in [{minimum}, {maximum}], got {text!r}")
        return value

    return parse


_MAX_STEPS = 2**62  # (schedule.MAX_START_STEP: the counters' headroom)
_positive_int = _int_in(1, _MAX_STEPS)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m onecycle_fused", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("plot", help="plot lr / momentum of a schedule and print a table")
    p.add_argument("params", nargs="*", metavar="key=value",
                   help="schedule parameters (DeepSpeed names; OneCycleLR's with --type TorchOneCycle or OneCycleLR; "
                        "JSON values)")
    p.add_argument("--config", help="DeepSpeed JSON config holding a scheduler entry")
    # OneCycleLR too, as a config's scheduler entry may name it: what a torch user types
    p.add_argument("--type", choices=sorted(_TYPES) + sorted(_TORCH_NAMES),
                   help="schedule type for key=value arguments (default OneCycle; a --config names its own)")
    p.add_argument("--steps", type=_positive_int, help="number of steps to plot (default: cycle + as much decay)")
    p.add_argument("--out", type=_image_path, help="image path, PNG unless its extension says .svg, .pdf... (omit to print the table only)")
    p.add_argument("--at", type=_steps_list, help="comma-separated steps for the table (default: 11 evenly spaced)")

    r = sub.add_parser("range-test", help="LR range test on a small built-in problem")
    r.add_argument("--min-lr", type=float, default=1e-3, help="lr of the first step (default 1e-3)")
    r.add_argument("--max-lr", type=float, default=3.0, help="lr of the last step (default 3); linear in between")
    r.add_argument("--steps", type=_int_in(2, _MAX_STEPS), default=100, help="number of steps, at least 2 (default 100)")
    r.add_argument("--optimizer", choices=["sgd", "adam", "adamw"], default="sgd",
                   help="fused optimizer to run (default sgd, momentum 0.9)")
    r.add_argument("--seed", type=_int_in(-(2**63), 2**64 - 1), default=0,  # (torch.manual_seed's range)
                   help="seed of the built-in problem and model (default 0)")
    r.add_argument("--backend", default="auto", help="auto, reference, cpu, cuda or triton (default auto)")
    r.add_argument("--max-lr-divisor", type=float, default=1.0,
                   help="suggest cycle_max_lr = (lr at the smoothed-loss minimum) / this (default 1: Smith's rule)")
    r.add_argument("--out", type=_image_path, help="image path for the loss curve (PNG unless its extension says otherwise)")
    return parser


def _check_out(path: str) -> None:
    """A bad --out, or --out without matplotlib, is an error line before any work."""
    from .plotting import image_target

    try:
        image_target(path, "--out")
    except ImportError as e:  # only ours: an error line; any other import failure keeps its traceback
        raise ValueError(str(e)) from e


def _plot(args) -> int:
    from .plotting import default_steps, format_table, plot_schedule, schedule_values_at

    if args.config and args.params:
        raise ValueError("give --config or key=value schedule arguments, not both")
    if args.config and args.type:
        raise ValueError("--type is for key=value arguments; the --config file's scheduler entry names its type")
    if args.out:
        _check_out(args.out)  # before any work
    if args.config:
        schedule = schedule_from_config(args.config)
    elif args.params or args.type:
        # a --type alone takes its defaults (LRRangeTest has one for every parameter)
        schedule = schedule_from_config({"type": args.type or "OneCycle", "params": _keyword_args(args.params)})
    else:
        raise ValueError("give --config ds.json or key=value schedule arguments (e.g. cycle_min_lr=1e-4 cycle_max_lr=1e-3)")
    steps = args.steps or default_steps(schedule)
    at = args.at if args.at is not None else sorted({round(i * (steps - 1) / 10) for i in range(11)})
    table = format_table(schedule_values_at(schedule, at))  # (an --at step beyond int64 raises: before any output)
    print(schedule)
    print(table)
    if args.out:
        print(f"wrote {plot_schedule(schedule, args.out, steps=steps, marks=at)}")
    return 0


def _range_test(args) -> int:
    from .range_test import lr_range_test, toy_problem

    if args.out:
        _check_out(args.out)  # before the test, not after it
    model, loss_fn, data = toy_problem(seed=args.seed)
    result = lr_range_test(model, loss_fn, data, min_lr=args.min_lr, max_lr=args.max_lr, num_steps=args.steps,
                           optimizer=args.optimizer, backend=args.backend, plot=args.out,
                           max_lr_divisor=args.max_lr_divisor)
    if not result.diverged:
        state = "completed"
    elif result.steps_run < args.steps:
        state = "diverged, stopped"
    else:  # only the check after the last step fired: nothing was cut short
        state = "completed (the loss diverged by the end)"
    print(f"range test {state} after {result.steps_run} steps (lr {result.lrs[0]:.3g} .. {result.lrs[-1]:.3g})")
    print(f"suggested cycle_min_lr = {result.cycle_min_lr:.6g}, cycle_max_lr = {result.cycle_max_lr:.6g}")
    config = {"scheduler": {"type": "OneCycle", "params": {
        "cycle_min_lr": float(f"{result.cycle_min_lr:.6g}"), "cycle_max_lr": float(f"{result.cycle_max_lr:.6g}")}}}
    print(json.dumps(config))
    if result.plot_path:
        print(f"wrote {result.plot_path}")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return _plot(args) if args.command == "plot" else _range_test(args)
    except ValueError as e:  # bad schedule parameters: one clear line, no traceback
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a --config that cannot be read, an --out that cannot be written
        print(f"error: {e.strerror or e}: {e.filename!r}" if e.filename else f"error: {e}", file=sys.stderr)
        return 2
