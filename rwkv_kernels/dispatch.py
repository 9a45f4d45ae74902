"""The one table that decides which implementation of each op runs.

    op x device x compute dtype x weight format x shape class -> implementation

Both model modes go through it: token mode (one token per stream) and sequence mode (a prompt). Keys:
  * device: "cpu" or "cuda"; anything else (meta, mps, ...) is a ValueError here, before any pointer
    reaches C.
  * compute: the activations' dtype name ("float32", "float16", "bfloat16"); "mixed" when the
    tensors of an element-wise op disagree.
  * weight_format: `format_name(w)`: a tensor's dtype name, or a packed weight object's `.format`
    (the name of its record in `rwkv_kernels.formats`); "-" for ops without a weight matrix.
  * shape: for products, "token" when x holds one token per stream (x [B, in] or [B, 1, in]),
    "short" for a sequence of at most `short_rows(format)` rows in all (its record's crossover for the
    build in use, SHORT_ROWS by default; a prompt chunk or a few prompt tokens), and "sequence"
    otherwise; for element-wise ops, "contiguous" or "strided".
The first matching row of TABLE wins ("*" matches anything). A row whose implementation needs the
C build names a fallback, used (with one warning per process) when the build is unavailable. An op
made of others (`COMPOSED_OF`: the decode step) runs composed when any of its parts is forced.

The rows of each weight format come from its record (`rwkv_kernels.formats`, `Serve`): registering a
format adds them. Implementations register themselves by name (`register_impl`, called by the modules
that define them), so this module imports none of them. An implementation that finds at run time that
it cannot take its inputs (the C decode step's plan) takes its row's fallback through `fall_back`,
with one warning per process. Callers that need a rule's answer ask (`has_kernel`) instead of
repeating it. Tests force a choice per op with `force(linear="reference")` and register a spy for a
block with `registered(op, name, fn)`; callers pass `backend=` to the op itself.
`python -m rwkv_kernels` prints the table and whether this machine has the C build.
"""
import contextlib
import threading
import warnings
from dataclasses import dataclass
from typing import Optional

import torch

from . import cpu_c, formats

DEVICES = ("cpu", "cuda")


@dataclass(frozen=True)
class Rule:
    op: str
    device: str
    compute: str
    weight_format: str
    shape: str
    impl: str
    fallback: Optional[str] = None          # when `impl` needs the C build and it is unavailable

    @property
    def weights(self):                      # the column's former name
        return self.weight_format

    def key(self):
        return (self.device, self.compute, self.weight_format, self.shape)

    def matches(self, key):
        return all(r in ("*", k) for r, k in zip(self.key(), key))


# The rows that do not depend on a weight format. The format rows (`linear` per format, `decode_layers`
# per format with a C code) come from the format records (rwkv_kernels/formats.py, `Serve`), placed before
# their op's catch-all row.
_FIXED = [
    #     op                device  compute    format     shape         impl         fallback
    Rule("linear",          "*",    "*",       "*",       "*",          "torch"),
    Rule("wkv",             "cuda", "*",       "-",       "*",          "triton"),
    Rule("wkv",             "cpu",  "*",       "-",       "*",          "c",         "numpy"),
    Rule("wkv_step",        "cuda", "*",       "-",       "*",          "triton"),
    Rule("wkv_step",        "cpu",  "*",       "-",       "*",          "numpy"),
    Rule("wkv_step_gated",  "cpu",  "float32", "-",       "contiguous", "c",         "composed"),
    Rule("wkv_step_gated",  "*",    "*",       "-",       "*",          "composed"),
    Rule("ln_shift_mix",    "cpu",  "float32", "-",       "contiguous", "c",         "reference"),
    Rule("ln_shift_mix",    "*",    "*",       "-",       "*",          "reference"),
    Rule("relu_square_",    "cpu",  "float32", "-",       "contiguous", "c",         "reference"),
    Rule("relu_square_",    "*",    "*",       "-",       "*",          "reference"),
    Rule("add_gated_",      "cpu",  "float32", "-",       "contiguous", "c",         "reference"),
    Rule("add_gated_",      "*",    "*",       "-",       "*",          "reference"),
    Rule("sample_rows",     "cpu",  "float32", "-",       "contiguous", "c",         "reference"),
    Rule("sample_rows",     "*",    "*",       "-",       "*",          "reference"),
    # a whole decode step through a run of layers (rwkv_kernels/decode.py): one C call on the CPU path for
    # every format the C step takes (the per-format rows), the ops composed otherwise
    Rule("decode_layers",   "*",    "*",       "*",       "*",          "composed"),
    # a whole model's token step (embedding, the layers, the final LayerNorm, the head): the same rows
    Rule("decode_token",    "*",    "*",       "*",       "*",          "composed"),
    # several tokens per stream through a run of layers (sequence mode): one C call for short sequences of
    # every format the C step takes (the per-format rows), else the model's ops on whole sequences
    Rule("sequence_layers", "*",    "*",       "*",       "*",          "composed"),
]
# An op made of others runs its composed implementation whenever one of its parts is forced or
# given a backend, so that a chosen implementation is never bypassed.
_STEP_PARTS = ("linear", "ln_shift_mix", "wkv_step", "wkv_step_gated", "relu_square_", "add_gated_")
COMPOSED_OF = {"decode_layers": ("composed", _STEP_PARTS),
               "decode_token": ("composed", _STEP_PARTS + ("decode_layers",)),
               "sequence_layers": ("composed", _STEP_PARTS + ("wkv",))}


def _format_rows():
    rows = {"linear": [], "decode_layers": [], "decode_token": [], "sequence_layers": []}
    for fmt in formats.all_formats():
        rows["linear"] += [Rule("linear", s.device, s.compute, fmt.name, s.shape, s.impl, s.fallback)
                           for s in fmt.serves]
        if fmt.code is not None:
            for op in ("decode_layers", "decode_token"):
                rows[op].append(Rule(op, "cpu", "float32", fmt.name, "contiguous", "c", "composed"))
            rows["sequence_layers"].append(Rule("sequence_layers", "cpu", "float32", fmt.name, "short", "c", "composed"))
    return rows


def _rebuild():
    """TABLE = the fixed rows with each format's rows before its op's catch-all (again whenever a
    format is registered or removed)."""
    rows, table = _format_rows(), []
    for rule in _FIXED:
        table += rows.pop(rule.op, ()) if rule.key() == _CATCH_ALL else ()
        table.append(rule)
    TABLE[:] = table
    _choice_cache.clear()
    _short_rows.clear()


TABLE = []
_CATCH_ALL = ("*", "*", "*", "*")
ALIASES = {"cpu": ("c", "numpy")}       # backend="cpu": the first of these the op has

_impls = {}                             # (op, name) -> (callable, needs_c)
_forced = {}                            # op -> impl name
_choice_cache = {}
_short_rows = {}                        # format name -> short_rows(name)
_UNSET = object()
_warned = set()
_rebuild()
formats.on_change(_rebuild)


def register_impl(op, name, fn, needs_c=False):
    """Make `fn` available as implementation `name` of `op` (called by the module defining it)."""
    _impls[(op, name)] = (fn, needs_c)
    _choice_cache.clear()


def unregister_impl(op, name):
    """Undo `register_impl` (tests; `registered` does it for a block)."""
    if _impls.pop((op, name), None) is None:
        raise ValueError(f"kernels: {op} implementation {name!r} is not registered")
    _choice_cache.clear()


@contextlib.contextmanager
def registered(op, name, fn, needs_c=False):
    """`register_impl` for the block only: afterwards `name` is what it was before (another callable,
    or nothing), so a spy a test registers does not leak into later tests."""
    before = _impls.get((op, name))
    register_impl(op, name, fn, needs_c)
    try:
        yield fn
    finally:
        if before is None:
            unregister_impl(op, name)
        else:
            _impls[(op, name)] = before
            _choice_cache.clear()


def registrations():
    """What decides now, as a value to compare: the implementations, the forced choices and the table
    (the test suite checks that no test leaves one of them changed)."""
    return {"implementations": dict(_impls), "forced": dict(_forced), "table": tuple(TABLE)}


def is_forced(op):
    """Whether a `force` block names `op` now."""
    return op in _forced


@contextlib.contextmanager
def force(**op_impls):
    """Within the block, run the named implementation of each given op: force(linear="reference")."""
    for op, name in op_impls.items():
        if not any(r.op == op for r in TABLE):
            raise ValueError(f"rwkv_kernels.dispatch.force: unknown op {op!r}")
    saved = dict(_forced)
    _forced.update(op_impls)
    _choice_cache.clear()
    try:
        yield
    finally:
        _forced.clear()
        _forced.update(saved)
        _choice_cache.clear()


# -- keys ------------------------------------------------------------------------------------------

_DTYPE_NAMES = {}


def dtype_name(dtype):
    name = _DTYPE_NAMES.get(dtype)
    if name is None:
        name = _DTYPE_NAMES[dtype] = str(dtype).removeprefix("torch.")
    return name


def format_name(w):
    """A plain tensor's format is its dtype name; a packed weight object says its own (`.format`)."""
    return dtype_name(w.dtype) if isinstance(w, torch.Tensor) else w.format


def device_of(*tensors):
    """The device type all tensors (or packed weights) share; ValueError for a device the kernels do
    not support."""
    try:
        if all(t.is_cpu for t in tensors):             # the common case, checked cheaply
            return "cpu"
    except AttributeError:                             # a packed weight: it has .device only
        pass
    kind = tensors[0].device.type
    for t in tensors:
        if t.device.type not in DEVICES:
            raise ValueError(f"kernels: tensors on device {t.device.type!r} are not supported "
                             f"(use {' or '.join(DEVICES)})")
        if t.device.type != kind:
            raise ValueError(f"kernels: tensors on different devices ({kind} and {t.device.type})")
    return kind


def compute_of(*tensors):
    """The tensors' common dtype name, or "mixed"."""
    first = tensors[0].dtype
    return dtype_name(first) if all(t.dtype == first for t in tensors) else "mixed"


def layout_of(*tensors):
    return "contiguous" if all(t.is_contiguous() for t in tensors) else "strided"


# A sequence of at most `short_rows(format)` rows in all runs as one C step on the decode kernels
# (`sequence_layers` "c"; per op, its products too) instead of a GEMM, which packs the whole weight matrix
# for a handful of rows: SHORT_ROWS (48) unless the format's record says otherwise for the build in use.
# `python -m bench.modes --chunks ...` (169m, 2 threads, one stream; GEMM time / C step time per forward,
# the C step in calls of 64 rows), Intel Xeon (AMX), 2026-12-07, 512-bit build: float32 1.08 at 48 rows,
# 1.05 at 64, 0.90 at 96; int8 1.58 at 256, 1.50 at 512, 1.28 at 2048 (never crossing); q4_k 1.14 at 512,
# 1.00 at 768, 0.93 at 1536; AVX2 build: float32 1.01 at 48, 0.94 at 64; int8 1.10 at 96, 0.90 at 128;
# q4_k 1.04 at 192, 0.93 at 256. Every format's figures: docs/results.md, Prompts.
SHORT_ROWS = formats.SHORT_ROWS


_local = threading.local()


@contextlib.contextmanager
def rows_independent():
    """Within the block (this thread), every sequence product takes the "short" rows of the table,
    whatever its row count: on the CPU those kernels compute each row alone (the decode products),
    so a prompt's results do not depend on which other prompts share the call. The server's batched
    prefill runs in this block; a device or format without such a row keeps its usual kernel."""
    before = getattr(_local, "rows_independent", False)
    _local.rows_independent = True
    try:
        yield
    finally:
        _local.rows_independent = before


def short_rows(fmt_name):
    """The most rows (streams x tokens) a sequence with weights of `fmt_name` may have and still be
    "short" (the C step, the decode kernels), for the build the C kernels run by default
    (`cpu_c.best_isa()`); None: any number."""
    rows = _short_rows.get(fmt_name, _UNSET)
    if rows is _UNSET:
        rows = _short_rows[fmt_name] = formats.get(fmt_name).short_rows_for(cpu_c.best_isa())
    return rows


def product_shape(x, fmt_name):
    """"token" for one token per stream (x [B, in] or [B, 1, in]); "short" for a sequence of at most
    `short_rows(fmt_name)` rows in all (any length within `rows_independent()`); else "sequence"."""
    if x.dim() <= 2 or (x.dim() == 3 and x.shape[1] == 1):
        return "token"
    limit = short_rows(fmt_name)
    if limit is None or x.numel() // x.shape[-1] <= limit or getattr(_local, "rows_independent", False):
        return "short"
    return "sequence"


# -- choosing --------------------------------------------------------------------------------------

def choose(op, key, backend=None, parts_chosen=False):
    """The implementation name for op at key = (device, compute, weights, shape). `backend` (an
    implementation name, or "cpu") overrides the forced choice, which overrides the table.
    parts_chosen: a caller gave one of the op's parts (COMPOSED_OF) a backend of its own."""
    cache_key = (op, key, backend, parts_chosen)
    name = _choice_cache.get(cache_key)
    if name is None:
        name = _choose(op, key, backend, parts_chosen)
        _choice_cache[cache_key] = name
    return name


def _choose(op, key, backend, parts_chosen=False):
    wanted = backend or _forced.get(op) or _composed_choice(op, parts_chosen)
    if wanted is not None:
        return _resolve_alias(op, wanted)
    return _usable(rule_for(op, key))


def _composed_choice(op, parts_chosen):
    composed = COMPOSED_OF.get(op)
    if composed is not None and (parts_chosen or any(part in _forced for part in composed[1])):
        return composed[0]
    return None


def rule_for(op, key):
    """The first row of TABLE for op that matches key."""
    for rule in TABLE:
        if rule.op == op and rule.matches(key):
            return rule
    raise ValueError(f"kernels: no {op} implementation for {'/'.join(key)}")


def has_kernel(op, key):
    """Whether op has a row of its own for key (not its catch-all): the question callers ask instead
    of repeating a row's conditions (e.g. "does sample_rows have a kernel for these logits?")."""
    cache_key = ("has_kernel", op, key)
    answer = _choice_cache.get(cache_key)
    if answer is None:
        answer = _choice_cache[cache_key] = rule_for(op, key).key() != _CATCH_ALL
    return answer


def _resolve_alias(op, name):
    candidates = ALIASES.get(name, (name,))
    for i, candidate in enumerate(candidates):
        if (op, candidate) not in _impls:
            continue
        if not _needs_c(op, candidate) or cpu_c.available():
            if i > 0 and _needs_c(op, candidates[0]) and (op, candidates[0]) in _impls:
                _warn_c_build(op, candidate)
            return candidate
        if len(candidates) == 1:
            raise ValueError(f"kernels: {op} backend {name!r} needs the C kernels, which are unavailable "
                             f"here ({cpu_c.unavailable_reason()})")
    known = sorted(n for o, n in _impls if o == op)
    label = op.replace("wkv", "WKV")
    raise ValueError(f"kernels: unknown {label} backend {name!r}: use one of {', '.join(known)}")


def _needs_c(op, name):
    return _impls.get((op, name), (None, False))[1]


def _usable(rule):
    if not _needs_c(rule.op, rule.impl) or cpu_c.available():
        return rule.impl
    if rule.fallback is None:
        raise ValueError(f"kernels: {rule.op} needs the C kernels here: {cpu_c.unavailable_reason()}")
    _warn_c_build(rule.op, rule.fallback)
    return rule.fallback


def _warn_c_build(op, fallback):
    """The one warning per process that the C build is missing and fallbacks run."""
    if "c-build" not in _warned:
        _warned.add("c-build")
        warnings.warn(f"kernels: the C CPU kernels are unavailable ({cpu_c.unavailable_reason()}); "
                      f"{op} and other ops run slower fallbacks ({fallback})", RuntimeWarning, stacklevel=5)


def fall_back(op, key, why):
    """(name, callable) of the fallback of op's row for key, for an implementation that finds at run
    time that it cannot take its inputs (`why`: one line); warns once per process and op."""
    rule = rule_for(op, key)
    if rule.fallback is None:
        raise ValueError(f"kernels: {op} {rule.impl} cannot run: {why}")
    if ("unusable", op) not in _warned:
        _warned.add(("unusable", op))
        warnings.warn(f"kernels: {op} runs its slower fallback {rule.fallback!r} instead of {rule.impl!r}: "
                      f"{why}", RuntimeWarning, stacklevel=3)
    return rule.fallback, implementation(op, rule.fallback)


def implementation(op, name):
    """The callable registered as `name` for `op`."""
    entry = _impls.get((op, name))
    if entry is not None:
        return entry[0]
    raise ValueError(f"kernels: {op} implementation {name!r} is not registered")


def pick(op, key, backend=None, parts_chosen=False):
    """(name, callable) of the implementation that runs for op at key."""
    name = choose(op, key, backend, parts_chosen)
    return name, implementation(op, name)


def describe():
    """The table as text, with the implementation this machine would run for each row."""
    lines = [f"{'op':16} {'device':6} {'compute':8} {'format':8} {'shape':10} -> impl (fallback)"]
    for r in TABLE:
        fb = f" ({r.fallback})" if r.fallback else ""
        lines.append(f"{r.op:16} {r.device:6} {r.compute:8} {r.weight_format:8} {r.shape:10} -> {r.impl}{fb}")
    reason = cpu_c.unavailable_reason()
    lines.append("C kernels: " + (f"available, {cpu_c.ops().isa} build" if reason is None else f"unavailable: {reason}"))
    return "\n".join(lines)
