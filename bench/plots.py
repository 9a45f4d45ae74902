"""Figures laid out like the paper's Appendix K: x = parameters (log scale), one line per family,
a CPU panel and a GPU panel; and the sequence-length figure of bench.seqlen. Every figure says in
a footnote (and its title, when all of it is) what ran on synthetic weights, and the sweep's
figures draw a run on a busy machine with a hollow marker, explained in a footnote."""
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import FuncFormatter  # noqa: E402

from bench.cpuload import BUSY_PCT  # noqa: E402
from bench.models import RWKV, family_label, family_style  # noqa: E402

DEVICE_LABELS = {"cpu": "CPU", "cuda": "GPU"}
PARAMS = FuncFormatter(lambda x, _: f"{x / 1e9:g}B" if x >= 1e9 else f"{x / 1e6:g}M")
# minor ticks of a log axis: label only 2x, 3x and 5x a power of ten, so the labels do not collide
PARAMS_MINOR = FuncFormatter(lambda x, _: PARAMS(x) if f"{x:.0e}"[0] in "235" else "")
PROTOCOL_LABELS = {"kv-cache": "transformers with KV cache", "paper": "paper protocol: transformers without KV cache"}
SYNTHETIC_TITLE = " [synthetic weights]"
BUSY_NOTE = (f"Hollow markers: other processes used more than {BUSY_PCT:.0f}% of the CPU during those runs; "
             "their timings are not quiet-machine timings.")


def synthetic_note(rows):
    """One sentence saying which of the rows ran on synthetic weights, or '' (none did)."""
    names = list(dict.fromkeys(r["model"] for r in rows if r.get("synthetic")))
    if not names:
        return ""
    what = "Synthetic weights (random values in each release's shapes, not the trained weights)"
    if all_synthetic(rows):
        return f"{what} for every model: times and memory are those of the real shapes; the text means nothing."
    return f"{what} for {', '.join(names)}: their times and memory are those of the real shapes."


def all_synthetic(rows):
    known = [r.get("synthetic") for r in rows if r.get("synthetic") is not None]
    return bool(known) and all(known)


def is_busy(row):
    return (row.get("others_cpu_pct") or 0) > BUSY_PCT


def footnotes(rows, busy_markers=True):
    """The figure's footnote lines: synthetic weights, and what a hollow marker means."""
    notes = [synthetic_note(rows)]
    if busy_markers and any(is_busy(r) for r in rows):
        notes.append(BUSY_NOTE)
    return [n for n in notes if n]


def _add_footnotes(fig, notes):
    """Footnote lines under the panels (the layout leaves them room)."""
    if notes:
        fig.text(0.01, 0.01, "\n".join(notes), ha="left", va="bottom", fontsize=8, wrap=True)
    fig.tight_layout(rect=(0, 0.035 * len(notes), 1, 1))


def _family_lines(ax, rows, y_of):
    """One line per family; a point measured on a busy machine gets a hollow marker."""
    fams = sorted({r["family"] for r in rows}, key=lambda f: (f != RWKV, f))
    for fam in fams:
        pts = sorted((r["n_params"], y_of(r), is_busy(r)) for r in rows if r["family"] == fam and y_of(r) is not None)
        if pts:
            color, marker = family_style(fam)
            xs, ys = [p for p, _, _ in pts], [y for _, y, _ in pts]
            quiet = [i for i, (_, _, busy) in enumerate(pts) if not busy]
            ax.plot(xs, ys, marker=marker if quiet else "", markevery=quiet or None, color=color,
                    label=family_label(fam), lw=2 if fam == RWKV else 1.3)
            busy = [(x, y) for x, y, b in pts if b]
            if busy:
                ax.plot([x for x, _ in busy], [y for _, y in busy], linestyle="none", marker=marker,
                        markerfacecolor="white", markeredgecolor=color, color=color)
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(PARAMS)
    ax.xaxis.set_minor_formatter(PARAMS_MINOR)
    ax.set_ylim(bottom=0)
    ax.grid(True, which="both", alpha=0.3)


def _panels(rows, y_of, ylabel, title):
    """One panel per device, CPU left and GPU right as in the paper (an empty one says so), with
    the footnotes of the rows plotted -> the figure (not saved)."""
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, device in zip(axes, ("cpu", "cuda")):
        dev_rows = [r for r in rows if r["device"] == device and r.get("status", "ok") == "ok"]
        _family_lines(ax, dev_rows, y_of)
        ax.set_title(DEVICE_LABELS[device])
        ax.set_xlabel("parameters")
        ax.set_ylabel(ylabel)
        if dev_rows:
            ax.legend()
        else:
            ax.set_xticks([], minor=False)
            ax.set_xticks([], minor=True)
            ax.set_yticks([])
            ax.text(0.5, 0.5, "not measured", ha="center", va="center", transform=ax.transAxes, color="gray")
    plotted = [r for r in rows if r.get("status", "ok") == "ok"]
    fig.suptitle(title + (SYNTHETIC_TITLE if all_synthetic(plotted) else ""))
    _add_footnotes(fig, footnotes(plotted))
    return fig


def _save(fig, path):
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def sweep_figure(summary, kind, protocol):
    """kind "memory": Figure 13 (peak memory excluding parameters); "time": Figure 14 (time for
    N tokens) -> the figure, not saved."""
    tokens = sorted({r["tokens"] for r in summary}) or [0]
    n = "/".join(str(t) for t in tokens)
    how = PROTOCOL_LABELS.get(protocol, protocol)
    if kind == "memory":
        return _panels(summary, lambda r: r["peak_bytes"] / 1e6 if r.get("peak_bytes") is not None else None,
                       "peak memory excluding parameters (MB)", f"Memory to generate {n} tokens, fp32 ({how})")
    return _panels(summary, lambda r: r.get("total_s"), f"time for {n} tokens (s)",
                   f"Time to generate {n} tokens, fp32 ({how})")


def sweep_figures(summary, out_dir, protocol):
    """Figure 13 (peak memory excluding parameters) and Figure 14 (time for N tokens), saved."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    return [_save(sweep_figure(summary, "memory", protocol), out_dir / f"fig13_memory_{protocol}.png"),
            _save(sweep_figure(summary, "time", protocol), out_dir / f"fig14_time_{protocol}.png")]


def seqlen_figure(curves, path, title):
    """curves: [{model, family, device, positions, peak_bytes, step_positions, step_s, synthetic}] ->
    peak memory of each run against its final position, and per-token latency against position."""
    fig, (ax_mem, ax_lat) = plt.subplots(1, 2, figsize=(12, 4.5))
    for c in curves:
        color, marker = family_style(c["family"])
        label = f"{c['model']} ({DEVICE_LABELS.get(c['device'], c['device'])})"
        ax_mem.plot(c["positions"], [b / 1e6 for b in c["peak_bytes"]], color=color, marker=marker, label=label)
        ax_lat.plot(c["step_positions"], [s * 1e3 for s in c["step_s"]], color=color, label=label, lw=1)
    ax_mem.set_xlabel("sequence length (prompt + generated tokens)")
    ax_mem.set_ylabel("peak memory excluding parameters (MB)")
    ax_lat.set_xlabel("position")
    ax_lat.set_ylabel("per-token latency (ms, rolling median)")
    for ax in (ax_mem, ax_lat):
        ax.set_ylim(bottom=0)
        ax.grid(True, alpha=0.3)
        if curves:
            ax.legend(fontsize=8)
    fig.suptitle(title + (SYNTHETIC_TITLE if all_synthetic(curves) else ""))
    _add_footnotes(fig, footnotes(curves, busy_markers=False))
    return _save(fig, path)
