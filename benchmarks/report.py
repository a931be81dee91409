"""Output: the console table, results.json, results.md and PNG plots."""
from __future__ import annotations

import json
import os
from typing import Optional

COLUMNS = [
    ("impl", "implementation"),
    ("median_ms", "median ms"),
    ("spread", "p10-p90 ms"),
    ("host_cpu_ms", "host CPU ms"),
    ("launches_per_step", "launches"),
    ("gbps", "GB/s"),
    ("frac_of_copy", "of copy"),
    ("vs_fused", "x fused+1cyc"),
    ("note", "note"),
]


FUSED_PEER = "torch-fused+OneCycleLR"  # the 'x fused+1cyc' column's denominator
# run.py's note on a run without plots (the GPU session's); rewrite() drops it when it makes them
NO_PLOTS_NOTE = "plots skipped (--no-plots)"


def fill_vs_fused(rows) -> None:
    """Set each measured row's ``vs_fused``: its median over the case's
    torch-fused+OneCycleLR row, when that row was measured and not caught
    computing the wrong step (agreement.py). Done over all rows of a results
    folder, so rows merged from separate runs (e.g. the GPU session's
    torch.compile rows) get the column too."""
    peers = {(r["set"], r["dtype"], r["opt"]): r for r in rows
             if r["impl"] == FUSED_PEER and r.get("status") == "ok" and r.get("agrees") is not False}
    for r in rows:
        r.pop("vs_fused", None)
        f = peers.get((r["set"], r["dtype"], r["opt"]))
        if r.get("status") == "ok" and f and r.get("median_ms") is not None and f.get("median_ms"):
            r["vs_fused"] = r["median_ms"] / f["median_ms"]


def _fmt(key, row) -> str:
    if row.get("status") != "ok":
        if key == "impl":
            return row["impl"]
        if key == "note":
            return f"{row.get('status')}: {row.get('note', '')}"
        return "-"
    v = row.get(key)
    if key == "spread":
        return f"{row['p10_ms']:.3g}-{row['p90_ms']:.3g}"
    if v is None:
        return "-"
    if key == "frac_of_copy":
        return f"{100 * v:.0f}%"
    if key == "vs_fused":
        return f"{v:.2f}x"
    if key == "launches_per_step":
        return f"{v:g}"
    if key == "host_cpu_ms" and row.get("host_cpu_clock") == "process":
        # a CUDA row whose thread clock did not tick (measure._stats): marked, as results.md's text says
        return f"{v:.3g} (process)"
    if isinstance(v, float):
        return f"{v:.3g}" if v < 100 else f"{v:.0f}"
    return str(v)


def case_title(case_rows) -> str:
    r = case_rows[0]
    copy = f"copy {r['copy_ms']:.3g} ms = {r['copy_gbps']:.3g} GB/s" if r.get("copy_ms") else "copy not measured"
    # (rows of runs before 2026-11-27 say nothing: interleaved on CPU, back to back on CUDA)
    how = {True: ", timed in interleaved rounds", False: ", timed back to back"}.get(r.get("interleaved"), "")
    return (f"{r['set']} ({r['n_tensors']} tensors, {r['n_params'] / 1e6:.1f}M params) / {r['dtype']} / {r['opt']}"
            f" - {r['bytes_per_step'] / 1e6:.0f} MB per step, {copy}{how}")


def group_cases(rows) -> list[list[dict]]:
    cases: dict[tuple, list] = {}
    for r in rows:
        cases.setdefault((r["set"], r["dtype"], r["opt"]), []).append(r)
    return list(cases.values())


def text_table(rows) -> str:
    out = []
    for case in group_cases(rows):
        cells = [[h for _, h in COLUMNS]] + [[_fmt(k, r) for k, _ in COLUMNS] for r in case]
        widths = [max(len(c[i]) for c in cells) for i in range(len(COLUMNS))]
        out.append(case_title(case))
        for j, line in enumerate(cells):
            out.append("  " + "  ".join(c.ljust(w) if i in (0, len(COLUMNS) - 1) else c.rjust(w)
                                         for i, (c, w) in enumerate(zip(line, widths))).rstrip())
            if j == 0:
                out.append("  " + "  ".join("-" * w for w in widths))
        out.append("")
    return "\n".join(out)


def targets_text(targets) -> str:
    lines = []
    for t in targets:
        mark = {True: "MET ", False: "MISS", None: "NOT MEASURED"}[t["met"]]
        v = "-" if t["value"] is None else f"{t['value']:.3f}"
        lines.append(f"  [{mark}] {t['target']} | {t['case']} | {v} {t['op']} {t['threshold']} | {t['detail']}")
    return "\n".join(lines)


def e2e_text(e2e: Optional[dict]) -> str:
    if not e2e:
        return "  (not run)"
    if e2e.get("error"):
        return f"  FAILED ({e2e.get('steps')} steps): {e2e['error']}"
    lines = [f"  {e2e['model']}, {e2e['steps']} steps (timed {e2e['timed_steps']})"]
    for name, v in e2e["variants"].items():
        if v.get("error"):
            lines.append(f"  {name:24s} FAILED: {v['error']}")
            continue
        lines.append(f"  {name:24s} {v['steps_per_s']:9.1f} steps/s  {v['speedup_vs_torch']:.2f}x torch  "
                     f"max|diff| vs torch {v['max_abs_diff_vs_torch']:.2e}  agrees {v['agrees_with_torch']}  "
                     f"bit-equal to ours eager {v['bitwise_equal_to_ours_eager']}"
                     + (f"  [backend {v['backend']}]" if "backend" in v else ""))
    return "\n".join(lines)


def _md_cell(text) -> str:
    """``text`` as one Markdown table cell: a ``|`` in it (``max |diff|``)
    would otherwise end the cell and shift the row's columns."""
    return str(text).replace("|", "\\|")


def _host_clock_text(rows) -> str:
    """Which CPU clock the rows' host time is: the stepping thread's on CUDA
    (measure._stats), the process's on CPU or where the thread clock did not tick."""
    clocks = {r.get("host_cpu_clock") for r in rows if r.get("host_cpu_ms") is not None}
    if "thread" in clocks:
        return ("host CPU = CPU time per step of the thread that steps" +
                (" (rows marked 'process': the process's, where that clock did not tick)"
                 if "process" in clocks else ""))
    return "host CPU = process CPU time per step"


def markdown(meta, rows, targets, e2e) -> str:
    md = [f"# Benchmark results: {meta['device_name']}", ""]
    md.append(f"Command: `{meta['command']}`  ")
    md.append(f"Date (UTC): {meta['date']}  ")
    md.append(", ".join(f"{k} {meta[k]}" for k in ("torch", "triton", "cuda", "deepspeed", "python") if meta.get(k)) + "  ")
    md.append(f"Device: {meta['device_name']}; host CPU: {meta['cpu']} ({meta['cpu_count']} cores, torch threads "
              f"{meta['torch_threads']}); git {meta['git']}  ")
    md.append(f"onecycle_fused backends available: {', '.join(meta['backends'])}  ")
    md.append(f"Load average (1, 5, 15 min) at start {meta.get('load_avg_start')}, at end {meta.get('load_avg_end')}")
    for n in meta.get("notes", []):
        md.append(f"\n> {n}")
    md += ["", "Median step time over back-to-back steps after warm-up (schedule included); "
           f"{_host_clock_text(rows)}; GB/s from the bytes a step must move (fp32: SGD-momentum 20, Adam/AdamW 28 "
           "per parameter; half that in bf16/fp16); 'of copy' = copy time of the same bytes / step time; 'x fused+1cyc' = step time / torch fused + OneCycleLR; launches = kernel and graph "
           "launches per step from torch.profiler (CUDA only: '-' on CPU).", ""]
    md += ["## Targets", "", "| | target | case | value | threshold | detail |", "|---|---|---|---|---|---|"]
    for t in targets:
        mark = {True: "met", False: "**missed**", None: "not measured"}[t["met"]]
        v = "-" if t["value"] is None else f"{t['value']:.3f}"
        cells = (mark, t["target"], t["case"], v, f"{t['op']} {t['threshold']}", t["detail"])
        md.append("| " + " | ".join(map(_md_cell, cells)) + " |")
    md += ["", "## End-to-end", "", "```", e2e_text(e2e), "```", "", "## Step times", ""]
    for case in group_cases(rows):
        md += [f"### {case_title(case)}", "", "| " + " | ".join(h for _, h in COLUMNS) + " |",
               "|" + "---|" * len(COLUMNS)]
        for r in case:
            md.append("| " + " | ".join(_md_cell(_fmt(k, r)) for k, _ in COLUMNS) + " |")
        md.append("")
    return "\n".join(md)


def bar_label(row) -> str:
    """A plot's label for a row: a row caught computing the wrong step
    (agreement.py) is drawn hollow and says so, as the tables do, so that its
    bar does not read as a valid peer."""
    return row["impl"] + (" (WRONG RESULTS)" if row.get("agrees") is False else "")


def make_plots(rows, e2e, out_dir) -> list[str]:
    """One PNG per parameter set (a panel per dtype x optimizer), plus the end-to-end run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    by_set: dict[str, list] = {}
    for case in group_cases(rows):
        by_set.setdefault(case[0]["set"], []).append(case)
    for set_name, cases in by_set.items():
        ncols = min(3, len(cases))
        nrows = (len(cases) + ncols - 1) // ncols
        fig, axes = plt.subplots(nrows, ncols, figsize=(6.5 * ncols, 0.35 * max(len(c) for c in cases) * nrows + 1.5 * nrows),
                                 squeeze=False)
        for ax, case in zip(axes.flat, cases):
            ok = [r for r in case if r.get("status") == "ok"]
            names = [bar_label(r) for r in ok]
            vals = [r["median_ms"] for r in ok]
            colors = ["white" if r.get("agrees") is False else "tab:green" if r["family"].startswith("ours")
                      else "tab:gray" for r in ok]
            ax.barh(range(len(ok)), vals, color=colors,
                    edgecolor=["tab:red" if r.get("agrees") is False else "none" for r in ok])
            ax.set_yticks(range(len(ok)), names, fontsize=7)
            ax.invert_yaxis()
            if case[0].get("copy_ms"):
                ax.axvline(case[0]["copy_ms"], color="tab:red", ls="--", lw=1, label="copy of the same bytes")
                ax.legend(fontsize=7, loc="lower right")
            ax.set_xlabel("median step time (ms)")
            ax.set_title(f"{case[0]['dtype']} / {case[0]['opt']}", fontsize=9)
        for ax in list(axes.flat)[len(cases):]:
            ax.axis("off")
        fig.suptitle(f"{set_name}: {cases[0][0]['n_tensors']} tensors, {cases[0][0]['n_params'] / 1e6:.1f}M params")
        fig.tight_layout()
        path = os.path.join(out_dir, f"step_time_{set_name}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    if e2e and not e2e.get("error"):
        fig, ax = plt.subplots(figsize=(6, 2.5))
        names = [n for n, v in e2e.get("variants", {}).items() if not v.get("error")]
        ax.barh(names, [e2e["variants"][n]["steps_per_s"] for n in names],
                color=["tab:gray" if n.startswith("torch") else "tab:green" for n in names])
        ax.invert_yaxis()
        ax.set_xlabel("steps / s")
        ax.set_title(f"end-to-end: {e2e['model']}", fontsize=9)
        fig.tight_layout()
        path = os.path.join(out_dir, "e2e.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def _replace(path: str, text: str) -> None:
    """Write ``path`` whole or not at all: the GPU session stops a run with a
    signal at its time limit, which may land while a checkpoint is written; a
    truncated results.json would lose the folder's rows and break the next
    run that merges into it."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def write_all(out_dir, meta, rows, targets, e2e, plots: bool = True) -> list[str]:
    os.makedirs(out_dir, exist_ok=True)
    _replace(os.path.join(out_dir, "results.json"),
             json.dumps({"meta": meta, "rows": rows, "targets": targets, "e2e": e2e}, indent=1))
    _replace(os.path.join(out_dir, "results.md"), markdown(meta, rows, targets, e2e))
    written = [os.path.join(out_dir, "results.json"), os.path.join(out_dir, "results.md")]
    return written + (make_plots(rows, e2e, out_dir) if plots else [])


def rewrite(out_dir: str) -> list[str]:
    """Re-derive results.md, the targets and the plots from a folder's results.json
    (e.g. after a GPU run brought back without plots: ``python -m benchmarks.report DIR``)."""
    from . import targets as targets_mod

    with open(os.path.join(out_dir, "results.json")) as f:
        data = json.load(f)
    meta = data["meta"]
    # the plots are made now: a run's note that it skipped them would be false
    meta["notes"] = [n for n in meta.get("notes", []) if n != NO_PLOTS_NOTE]
    device_type = meta.get("device", "cuda" if meta.get("gpu") else "cpu")
    fill_vs_fused(data["rows"])
    targ = targets_mod.evaluate(device_type, data["rows"], data.get("e2e"))
    return write_all(out_dir, meta, data["rows"], targ, data.get("e2e"))


def merge(out_dir: str, others: list[str]) -> None:
    """Add the rows of other results folders to ``out_dir``'s results.json, as
    ``benchmarks.run --out out_dir`` would have (a row of a later folder
    replaces the same set / dtype / optimizer / implementation; the end-to-end
    run of the last folder that has one). For GPU phases brought back as
    separate folders: phase 2 need not wait for phase 1's folder (MERGE_FROM)
    while the machine is warm for only ~30 s."""
    from .run import _merge

    with open(os.path.join(out_dir, "results.json")) as f:
        data = json.load(f)
    for other in others:
        with open(os.path.join(other, "results.json")) as f:
            new = json.load(f)
        meta, rows, e2e = _merge(data, new["meta"], new["rows"], new.get("e2e"))
        data = {"meta": meta, "rows": rows, "e2e": e2e}
    _replace(os.path.join(out_dir, "results.json"), json.dumps(dict(data, targets=[]), indent=1))


def main(argv=None) -> int:
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.report",
        description="Rewrite a results folder's results.md, targets and plots from its results.json; "
                    "the rows of the other folders are merged into it first (e.g. the two GPU phases).")
    parser.add_argument("results_dir", help="folder holding results.json (written back)")
    parser.add_argument("more", nargs="*", metavar="more_dirs", help="folders whose rows are merged in, in order")
    args = parser.parse_args(argv)
    for folder in [args.results_dir] + args.more:
        path = os.path.join(folder, "results.json")
        if not os.path.isfile(path):
            parser.error(f"{folder!r} holds no results.json")
        with open(path) as f:
            data = json.load(f)
        if not isinstance(data, dict) or not {"meta", "rows"} <= set(data):
            # (benchmarks/results/convergence holds the convergence study's own results.json)
            parser.error(f"{path!r} is not a benchmarks.run results file (no 'meta' and 'rows')")
    if args.more:
        merge(args.results_dir, args.more)
    for path in rewrite(args.results_dir):
        print("wrote", path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
