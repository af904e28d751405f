"""Plots of ``distillcse bench memory`` results, from the CSV alone.

    from distillcse.plot import plot_results
    plot_results("benchmarks/results/<stamp>/results.csv", "benchmarks/results/<stamp>")

or ``distillcse bench plot CSV [--out DIR]``. Writes ``memory_vs_batch.png`` and
``time_vs_batch.png``: log-log, one line per implementation, an x where a series ended (out of
memory, over the memory cap or the time cap), the bare GEMMs of a forward and backward as a
dashed yardstick on the time plot. Uses matplotlib's object API with the Agg canvas: no global backend change.
"""
import csv
import math
import os

from . import checks

STYLE = {  # colour, marker: the fused and chunked backends in strong colours, baselines muted
    "reference": ("#7f7f7f", "s"),
    "plain": ("#1f77b4", "o"),
    "plain-compile": ("#17becf", "D"),
    "torch": ("#2ca02c", "^"),
    "triton": ("#d62728", "v"),
    "inf-cl": ("#9467bd", "P"),
}
WHAT_TITLES = {"contrastive": "contrastive term (InfoNCE)", "distill": "distillation term (Group-P)",
               "full": "full loss (contrastive + Group-P distillation)"}
GEMM_LABELS = {"contrastive": "z1 z2ᵀ", "distill": "z1 z1ᵀ + T Tᵀ", "full": "z1 z2ᵀ + z1 z1ᵀ + T Tᵀ"}
BACKWARD_GEMM_LABELS = {"contrastive": "G z2, Gᵀ z1", "distill": "(G + Gᵀ) z1", "full": "G z2, Gᵀ z1, (G + Gᵀ) z1"}
COLUMNS = ("impl", "label", "B", "status", "time_ms", "peak_mem_mib", "memory_kind", "what", "D", "Dt", "K",
           "dtype", "shuffle", "device_name", "torch", "triton", "commit", "timestamp")  # those the plots read
END_MARKS = {"OOM": "OOM", "skipped (cap)": "over memory cap", "skipped (time cap)": "over time cap",
             "error": "error", "skipped (compile failed)": "compile failed"}


NUMBERS = ("time_ms", "peak_mem_mib", "gemm_ms")  # of an ok point: finite numbers, or empty (not drawn)


def _yardstick_label(row):
    """The dashed line's legend: the bare GEMMs a row's ``gemm_ms`` timed (forward and backward
    since the ``gemms`` column; CSVs from before it timed the forward's only)."""
    what = row["what"]
    forward, backward = GEMM_LABELS.get(what, ""), BACKWARD_GEMM_LABELS.get(what, "")
    if hard_negatives_phrase(row):  # the contrastive columns: z2, then the hard negatives
        forward, backward = (label.replace("z2", "[z2; hn]") for label in (forward, backward))
    if row.get("gemms") == "fwd+bwd":
        return f"bare GEMMs, forward and backward\n({forward}; {backward})"
    return f"bare forward GEMMs\n({forward})"


def check_matplotlib():
    """Raises ImportError saying how to install matplotlib when it does not import."""
    try:
        import matplotlib.backends.backend_agg  # noqa: F401
        import matplotlib.figure  # noqa: F401
    except ImportError as err:
        raise ImportError(f"the plots need matplotlib, which does not import here ({err}): "
                          "pip install matplotlib") from None


def _read(csv_path):
    """The rows of a results.csv; a ValueError naming the file (and the line and column) where it is
    none: missing columns, a row cut short, a batch size that is not an integer >= 1, a time or
    memory of an ok point that is not a number."""
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            missing = [c for c in COLUMNS if c not in (reader.fieldnames or ())]
            if missing:
                raise ValueError(f"{csv_path} is not a results.csv of `distillcse bench memory`: "
                                 f"no column(s) {', '.join(missing)}")
            if "point" in reader.fieldnames:
                raise ValueError(f"{csv_path} is a targets.csv of `distillcse bench targets` (its table is "
                                 "targets.md); bench plot draws the results.csv of `distillcse bench memory`")
            rows = []
            for row in reader:
                where = f"{csv_path}, line {reader.line_num}"
                _check_row(row, where, len(reader.fieldnames))
                if rows and _run(row) != _run(rows[0]):
                    raise ValueError(f"{where}: {_run(row)}, where line 2 has {_run(rows[0])}: one plot draws "
                                     "one run's settings (a CSV of several runs?)")
                rows.append(row)
            return rows
    except (csv.Error, UnicodeDecodeError) as err:
        raise ValueError(f"{csv_path} is not a results.csv of `distillcse bench memory`: {err}") from None


def _check_row(row, where, width):
    if None in row or None in row.values():
        given = width - list(row.values()).count(None) + len(row.get(None, ()))
        raise ValueError(f"{where}: {given} fields, the header has {width} (a file cut short?)")
    try:
        ok = int(row["B"]) >= 1
    except ValueError:
        ok = False
    if not ok:
        raise ValueError(f"{where}, column B: expected a batch size (an integer >= 1), got {row['B']!r}")
    hard = row.get("hard_per_row", "")   # absent from CSVs before 2026-12-06's hard negatives
    if hard != "" and not (hard.isdigit() and hard.isascii()):
        raise ValueError(f"{where}, column hard_per_row: expected an integer >= 0 or nothing, got {hard!r}")
    if row["status"] != "ok":
        return
    for column in NUMBERS:
        value = row.get(column, "")
        try:
            ok = value == "" or math.isfinite(float(value))
        except ValueError:
            ok = False
        if not ok:
            raise ValueError(f"{where}, column {column}: expected a finite number or nothing, got {value!r}")


def _series(rows):
    """{impl: rows sorted by B}, in the order the implementations first appear."""
    out = {}
    for row in rows:
        out.setdefault(row["impl"], []).append(row)
    for impl in out:
        out[impl].sort(key=lambda r: int(r["B"]))
    return out


def _batch_label(B, _pos=None):
    B = int(round(B))
    for unit, size in (("M", 2 ** 20), ("K", 2 ** 10)):
        if B >= size and B % size == 0:
            return f"{B // size}{unit}"
    return str(B)


def _bytes_label(mib, _pos=None):
    value = mib * 2 ** 20
    for unit, size in (("TiB", 2 ** 40), ("GiB", 2 ** 30), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
        if value >= size:
            return f"{value / size:.3g} {unit}"
    return f"{value:.3g} B"


def _time_label(ms, _pos=None):
    if ms >= 1e3:
        return f"{ms / 1e3:g} s"
    if ms >= 1:
        return f"{ms:g} ms"
    return f"{ms * 1e3:g} µs"


def hard_negatives_phrase(row, prefix=""):
    """``prefix`` + "R hard negatives a row" for a row of a sweep with them, else "" (also for
    CSVs from before the ``hard_per_row`` column)."""
    hard = int(row.get("hard_per_row") or 0)
    return f"{prefix}{hard} hard negative{'s' if hard > 1 else ''} a row" if hard else ""


def settings_phrase(row):
    """A run's settings in words: the teachers and the shuffle only where the distillation term ran."""
    teacher = "" if row["what"] == "contrastive" else f", Dt={row['Dt']}, K={row['K']}"
    shuffle = "" if row["what"] == "contrastive" else f", shuffle={row['shuffle']}"
    return f"D={row['D']}{teacher}, {row['dtype']}{shuffle}{hard_negatives_phrase(row, ', ')}"


def _run(row):
    """What a CSV row's run measured, where: rows of one plot must agree on it."""
    return f"{row['what']} on {row['device_name']}: {settings_phrase(row)}"


def _subtitle(first):
    return (f"{WHAT_TITLES.get(first['what'], first['what'])} · {settings_phrase(first)}\n"
            f"{first['device_name']} · torch {first['torch']} · triton {first['triton']} · "
            f"commit {first['commit']} · {first['timestamp']}")


def _end_of_series(points):
    """The row that ended a series after at least one good point, else None."""
    seen_ok = False
    for row in points:
        if row["status"] == "ok":
            seen_ok = True
        elif seen_ok:
            return row if row["status"] in END_MARKS else None
    return None


def _slope_guides(ax, series_points):
    """Faint lines proportional to B and B^2 through the lowest first point, to read slopes by."""
    firsts = [pts[0] for pts in series_points if pts]
    if not firsts:
        return
    B0, y0 = min(firsts, key=lambda p: p[1])
    B1 = max(B for pts in series_points for B, _ in pts)
    if B1 <= B0:
        return
    for power, text in ((1, "∝ B"), (2, "∝ B²")):
        y1 = y0 * (B1 / B0) ** power
        ax.plot([B0, B1], [y0, y1], color="#999999", linewidth=0.9, linestyle=(0, (1, 3)), zorder=0)
        ax.annotate(text, (B1, y1), textcoords="offset points", xytext=(6, -3), fontsize=8, color="#888888",
                    ha="left")  # past the last batch size, clear of the series


def _plot(rows, column, path, *, title, ylabel, formatter, gemm=False, guides=False, ybase=10):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullFormatter

    first = rows[0]
    fig = Figure(figsize=(11, 5.8), dpi=150)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    not_run, omitted, ended, drawn = [], 0, False, []
    all_B = sorted({int(r["B"]) for r in rows})
    for impl, points in _series(rows).items():
        color, marker = STYLE.get(impl, ("#444444", "o"))
        good = [(int(r["B"]), float(r[column])) for r in points if r["status"] == "ok" and r[column]]
        shown = [(B, v) for B, v in good if v > 0]
        omitted += len(good) - len(shown)
        label = points[0]["label"]
        if not shown:
            statuses = sorted({r["status"] for r in points})
            not_run.append(f"{label}: {', '.join(statuses)}")
            continue
        drawn.append(shown)
        ax.plot(*zip(*shown), color=color, marker=marker, markersize=5, linewidth=1.8, label=label)
        end = _end_of_series(points)
        if end is not None:
            ended = True
            B_end, y_end = int(end["B"]), shown[-1][1]
            ax.plot([shown[-1][0], B_end], [y_end, y_end], color=color, linewidth=1, linestyle=":")
            ax.scatter([B_end], [y_end], marker="x", s=90, linewidths=2.2, color=color, zorder=5)
            ax.annotate(END_MARKS[end["status"]], (B_end, y_end), textcoords="offset points", xytext=(6, 5),
                        fontsize=7.5, color=color)
    if gemm:
        yard = {}
        for r in rows:
            if r["status"] == "ok" and r.get("gemm_ms") and r["impl"] != "inf-cl":
                yard.setdefault(int(r["B"]), float(r["gemm_ms"]))
        if yard:
            Bs = sorted(yard)
            ax.plot(Bs, [yard[B] for B in Bs], color="black", linestyle="--", linewidth=1.2, marker="_",
                    markersize=9, label=_yardstick_label(first))
    if guides:
        _slope_guides(ax, drawn)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log", base=ybase)  # memory: powers of 2, so the ticks read 1 MiB, 4 MiB, ...
    ax.set_xlim(all_B[0] / 1.25, all_B[-1] * (1.9 if ended else 1.25))  # room for the end labels
    ticks = all_B if len(all_B) <= 12 else all_B[:: -(-len(all_B) // 12)]
    ax.xaxis.set_major_locator(FixedLocator(ticks))
    ax.xaxis.set_major_formatter(FuncFormatter(_batch_label))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.yaxis.set_major_formatter(FuncFormatter(formatter))
    low, high = ax.get_ylim()
    if drawn and math.floor(math.log(high, ybase)) < math.ceil(math.log(low, ybase)):   # no power of the base
        ax.yaxis.set_major_locator(FixedLocator(sorted({float(f"{low * (high / low) ** f:.2g}")   # in range:
                                                        for f in (0.2, 0.5, 0.8)})))          # no major tick
        ax.yaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("batch size B (rows; log scale)")
    ax.set_ylabel(ylabel)
    ax.grid(True, which="major", alpha=0.35)
    if ybase == 10:
        ax.grid(True, which="minor", axis="y", alpha=0.12)
    handles, labels = ax.get_legend_handles_labels()
    if ended:
        handles.append(Line2D([], [], color="black", marker="x", linestyle="none", markersize=8))
        labels.append("series ended at this B\n(OOM or over a cap; drawn\nat the last measured value)")
    if handles:  # outside the axes: the slow series climb into every corner
        ax.legend(handles, labels, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8,
                  frameon=False, borderaxespad=0.0)
    fig.suptitle(title, fontsize=13, fontweight="bold")
    ax.set_title(_subtitle(first), fontsize=8, color="#333333")
    notes = []
    if not_run:
        notes.append("not shown: " + "; ".join(not_run))
    if omitted:
        notes.append(f"{omitted} point(s) with no measurable growth (0) omitted from the log scale")
    if notes:
        fig.text(0.01, 0.005, "\n".join(notes), fontsize=7, color="#555555", va="bottom")
    fig.tight_layout(rect=(0, 0.035 * len(notes), 1, 1))
    fig.savefig(path)
    return path


PLOT_FILES = ("memory_vs_batch.png", "time_vs_batch.png")


def plot_results(csv_path, out_dir=None):
    """Writes memory_vs_batch.png and time_vs_batch.png for a results CSV; returns their paths."""
    rows = _read(csv_path)
    if not rows:
        raise ValueError(f"{csv_path} has no result rows")
    if not any(r["status"] == "ok" for r in rows):
        raise ValueError(f"{csv_path}: no point was measured (every point: "
                         f"{', '.join(sorted({r['status'] for r in rows}))}); nothing to draw")
    out_dir = out_dir or os.path.dirname(os.path.abspath(csv_path))
    os.makedirs(out_dir, exist_ok=True)
    kind = rows[0]["memory_kind"]
    memory = _plot(rows, "peak_mem_mib", os.path.join(out_dir, PLOT_FILES[0]),
                   title="Peak extra memory of one forward+backward vs batch size",
                   ylabel=f"peak extra memory ({kind}; log scale)", formatter=_bytes_label,
                   guides=True, ybase=2)
    timing = _plot(rows, "time_ms", os.path.join(out_dir, PLOT_FILES[1]),
                   title="Forward+backward time vs batch size",
                   ylabel="median time per forward+backward (log scale)", formatter=_time_label, gemm=True)
    return [memory, timing]


def run_plot(csv_path, out_dir, error):
    """The command: plots ``csv_path`` into ``out_dir`` and prints their paths; ``error(message)``
    exits on a bad argument or file, a missing matplotlib exits saying how to install it."""
    if os.path.isdir(csv_path):
        inside = os.path.join(csv_path, "results.csv")
        error(f"{csv_path} is a folder; expected a results.csv" + (f" (such as {inside})" if os.path.isfile(inside) else ""))
    if not os.path.isfile(csv_path):
        error(f"{csv_path}: no such file")
    if out_dir is not None:
        try:
            checks.check_out_dir(out_dir)
        except SystemExit as bad:            # --out a file, under a file or not writable
            error(str(bad.code))
    try:
        check_matplotlib()
    except ImportError as err:
        raise SystemExit(f"distillcse bench plot: {err}") from None
    try:
        paths = plot_results(csv_path, out_dir)
    except (OSError, ValueError) as err:
        error(str(err))
    print("\n".join(paths))


def main(argv=None):
    import argparse
    p = argparse.ArgumentParser(prog="python -m distillcse.plot", description=__doc__.splitlines()[0])
    p.add_argument("csv")
    p.add_argument("--out", default=None, help="folder for the PNGs (default: the CSV's folder)")
    args = p.parse_args(argv)
    run_plot(args.csv, args.out, p.error)


if __name__ == "__main__":
    main()
