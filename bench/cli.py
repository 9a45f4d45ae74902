"""What every `python -m bench.<name>` command shares: one-line argument errors, argument types that
reject nonsense (0 tokens, negative timeouts), the top level that turns the project's own errors
into one line and exit 2 (`command`, from `rwkv_engine.cli`), checking an output path before any
work, atomic writes of JSON, text and figures (both through `rwkv_engine.files`), number
formatting, and the paired ratio of two things timed round by round. Nothing here imports another
bench module."""
import argparse
import json
import statistics
import sys
from pathlib import Path

from rwkv_kernels import formats
from rwkv_engine import files
from rwkv_engine.cli import OneLineParser, command, run_command  # noqa: F401 (re-exported: every command's top level)
from rwkv_engine.files import first_line  # noqa: F401 (re-exported)

WEIGHT_FORMATS = formats.NAMES          # --weights choices: the registered weight formats (live)


def fail(prog, message):
    """Print `prog: error: message` (one line) and exit with status 2."""
    print(f"{prog}: error: {first_line(message)}", file=sys.stderr)
    sys.exit(2)


def _number(kind, minimum, inclusive):
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if value != value or value in (float("inf"), float("-inf")):
            raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
        if value < minimum or (value == minimum and not inclusive):
            raise argparse.ArgumentTypeError(f"must be {'>=' if inclusive else '>'} {minimum}, got {text}")
        return value
    parse.__name__ = kind.__name__                  # argparse names the type in its messages
    return parse


positive_int = _number(int, 1, True)                # --tokens, --repeats, --threads, --batch
positive_float = _number(float, 0, False)           # --timeout, --mem-budget-gb
nonnegative_float = _number(float, 0, True)         # --wait-quiet


def positive_int_list(text):
    """"1,2,4" -> [1, 2, 4] (argparse type: --chunks, --stages ...)."""
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"values must be >= 1, got {text!r}")
    return values


def check_writable_file(path, what="output"):
    """Raise ValueError (one line, naming `what` and the path) unless `path` can be written as a
    regular file: checked before any work, by creating its directory and a temporary file there
    (removed), so a long run never fails at its last step. An existing directory is refused."""
    try:
        files.probe_output(path, what, "file")
    except files.WriteError as e:
        raise ValueError(first_line(e)) from None


def check_writable_dir(path, what="output directory"):
    """Raise ValueError unless `path` is (or is now created as) a directory a file can be written in."""
    try:
        files.probe_output(path, what, "dir", inside=True)
    except files.WriteError as e:
        raise ValueError(first_line(e)) from None


def write_json_atomic(path, obj):
    """Write JSON to `path` through the engine's one atomic writer; no temporary file is left behind
    (a full disk raises WriteError, one line naming the path)."""
    text = json.dumps(obj, indent=1, allow_nan=False, default=str)
    write_text_atomic(path, text)


def write_text_atomic(path, text):
    """Write text to `path` atomically (a temporary beside it, then os.replace)."""
    files.atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def save_figure_atomic(fig, path):
    """fig.savefig(path) through a temporary beside it: a full disk leaves no partial PNG."""
    fmt = Path(path).suffix.lstrip(".") or "png"
    files.atomic_write(path, lambda tmp: fig.savefig(tmp, format=fmt, dpi=120))


def fmt_bytes(n):
    return "-" if n is None else files.format_bytes(n)


def fmt_params(n):
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.0f}M" if n >= 1e7 else f"{n / 1e6:.2f}M"


def paired_ratio(num, den):
    """(median, q1, q3) of num[k] / den[k] over the rounds k (quartiles inclusive of the extremes).
    Two things timed back to back within each round share that round's speed of the machine, so
    their ratio round by round is steadier than the ratio of their medians on a machine whose speed
    drifts over minutes (a VM beside other tenants)."""
    ratios = [a / b for a, b in zip(num, den)]
    if not ratios:
        raise ValueError("paired_ratio: no rounds")
    q1, _, q3 = statistics.quantiles(ratios, n=4, method="inclusive") if len(ratios) > 1 else ratios * 3
    return statistics.median(ratios), q1, q3


def fmt_paired(r):
    """paired_ratio's result as "1.031 (1.012-1.049)"."""
    return f"{r[0]:.3f} ({r[1]:.3f}-{r[2]:.3f})"
