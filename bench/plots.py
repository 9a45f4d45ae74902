"""Figures laid out like the paper's Appendix K: x = parameters (log scale), one line per family,
a CPU panel and a GPU panel; and the sequence-length figure of bench.seqlen."""
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import FuncFormatter  # noqa: E402

from bench.models import RWKV, family_label, family_style  # noqa: E402

DEVICE_LABELS = {"cpu": "CPU", "cuda": "GPU"}
PARAMS = FuncFormatter(lambda x, _: f"{x / 1e9:g}B" if x >= 1e9 else f"{x / 1e6:g}M")
# minor ticks of a log axis: label only 2x, 3x and 5x a power of ten, so the labels do not collide
PARAMS_MINOR = FuncFormatter(lambda x, _: PARAMS(x) if f"{x:.0e}"[0] in "235" else "")
PROTOCOL_LABELS = {"kv-cache": "transformers with KV cache", "paper": "paper protocol: transformers without KV cache"}


def _family_lines(ax, rows, y_of):
    fams = sorted({r["family"] for r in rows}, key=lambda f: (f != RWKV, f))
    for fam in fams:
        pts = sorted((r["n_params"], y_of(r)) for r in rows if r["family"] == fam and y_of(r) is not None)
        if pts:
            color, marker = family_style(fam)
            ax.plot([p for p, _ in pts], [y for _, y in pts], marker=marker, color=color,
                    label=family_label(fam), lw=2 if fam == RWKV else 1.3)
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(PARAMS)
    ax.xaxis.set_minor_formatter(PARAMS_MINOR)
    ax.set_ylim(bottom=0)
    ax.grid(True, which="both", alpha=0.3)


def _panels(rows, y_of, ylabel, title, path):
    """One panel per device, CPU left and GPU right as in the paper (an empty one says so)."""
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
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def sweep_figures(summary, out_dir, protocol):
    """Figure 13 (peak memory excluding parameters) and Figure 14 (time for N tokens)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokens = sorted({r["tokens"] for r in summary}) or [0]
    n = "/".join(str(t) for t in tokens)
    how = PROTOCOL_LABELS.get(protocol, protocol)
    mem = _panels(summary, lambda r: r["peak_bytes"] / 1e6 if r.get("peak_bytes") is not None else None,
                  "peak memory excluding parameters (MB)",
                  f"Memory to generate {n} tokens, fp32 ({how})", out_dir / f"fig13_memory_{protocol}.png")
    time = _panels(summary, lambda r: r.get("total_s"), f"time for {n} tokens (s)",
                   f"Time to generate {n} tokens, fp32 ({how})", out_dir / f"fig14_time_{protocol}.png")
    return [mem, time]


def seqlen_figure(curves, path, title):
    """curves: [{model, family, device, positions, peak_bytes, step_positions, step_s}] -> peak memory
    of each run against its final position, and per-token latency against position."""
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
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)
