"""File I/O shared by the engine and the baselines: one home for the cache directory, output-path
checks, atomic writes, checkpoint reading (safetensors, `.pth`/`.bin`, Hugging Face directories) and
streaming safetensors writing.

Reading: `weight_files(dir)` lists a Hugging Face directory's weight files, `open_weights(file)` gives
{key: (shape, dtype, fetch)} without reading tensor data, `dtype_problem` / `check_values` validate
what is then fetched. Writing: `check_output_path` before any work, then `atomic_write` (one file) or
`atomic_dir` (a directory, swapped in whole): a temporary beside the destination, fsync, os.replace.
Temporaries carry the writer's pid, so `clean_stale_temps` can remove those of dead writers.
"""
import contextlib
import errno
import json
import math
import os
import pickle
import re
import secrets
import shutil
import signal
import stat
import struct
import sys
import threading
import zipfile
from pathlib import Path

import torch

CACHE_ENV = "RWKV_ENGINE_CACHE"

# Tensor dtypes a checkpoint may hold (others, e.g. float8 or ints, are refused with a clear error).
SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
SAFETENSORS_NAMES = {v: k for k, v in SAFETENSORS_DTYPES.items()}
WEIGHT_DTYPES = tuple(SAFETENSORS_DTYPES.values())
DTYPE_TAGS = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64"}

# Every weight must stay finite in every dtype a model may be loaded in: the largest float16.
MAX_ABS_WEIGHT = 65504.0

# Model dimensions no real checkpoint comes near (RWKV-4 14B: 40 layers, n_embd 5120, ffn 20480;
# the largest vocabularies ship ~256k rows). A checkpoint or config.json declaring more is refused
# before any tensor is read: its shapes would have the loaders build or scan absurd tensors.
DIMENSION_LIMITS = {"n_layer": 1 << 10, "n_embd": 1 << 16, "n_head": 1 << 16, "ffn_dim": 1 << 18,
                    "vocab_size": 1 << 21, "max_len": 1 << 20}

INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
SINGLE_FILES = ("model.safetensors", "pytorch_model.bin")


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used; the message names the file and the problem."""


class WriteError(OSError):
    """An output that cannot be written (unwritable, not a regular file, disk full); one line."""


def first_line(e):
    """The first line of an exception's message (its type name when the message is empty)."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def cache_dir():
    """Where generated files live: $RWKV_ENGINE_CACHE or ~/.cache/rwkv_engine."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "rwkv_engine")


def synthetic_path(name, dtype=torch.float32, seed=0, fmt="pth", root=None):
    """The one naming scheme of synthetic checkpoints: <cache>/synthetic/<name>-<fp32|fp16|bf16>-seed<N>.<fmt>.
    fmt "hf" is a Hugging Face directory; the baselines' default one (float16, seed 0) is <cache>/synthetic/<name>."""
    base = Path(root or cache_dir()) / "synthetic"
    if fmt == "hf":
        return base / name if (dtype, seed) == (torch.float16, 0) else base / f"{name}-{DTYPE_TAGS[dtype]}-seed{seed}"
    return base / f"{name}-{DTYPE_TAGS[dtype]}-seed{seed}.{fmt}"


# ---------------------------------------------------------------------------------------------
# Paths

def regular_file(path, what="file"):
    """`path` (symlinks followed) must be an existing regular file: a FIFO or device would block or lie."""
    path = Path(path)
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such file or directory") from None
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({first_line(e)})") from None
    if not stat.S_ISREG(mode):
        raise CheckpointError(f"{path}: not a regular {what}")
    return path


def _existing_ancestor(path):
    for parent in path.parents:
        if parent.exists() or parent.is_symlink():
            return parent
    return Path(".")


def check_output_path(path, kind="file", overwrite=True):
    """Check before any work that `path` can be written as a file (kind "file") or a directory
    (kind "dir"): its first existing ancestor is a writable directory, and an existing destination
    is of that kind (a file: regular, not a symlink or device; a dir: replaced only with `overwrite`
    when non-empty). Raises WriteError naming the path."""
    path = Path(path)
    ancestor = _existing_ancestor(path)
    if not ancestor.is_dir():
        raise WriteError(f"{path}: cannot write under {ancestor}, which is not a directory")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise WriteError(f"{path}: directory {ancestor} is not writable")
    if not (path.exists() or path.is_symlink()):
        return path
    mode = path.lstat().st_mode
    if kind == "file":
        if stat.S_ISDIR(mode):
            raise WriteError(f"{path}: is a directory, expected a file path")
        if not stat.S_ISREG(mode):
            raise WriteError(f"{path}: exists and is not a regular file (a symlink, device or FIFO); refusing to replace it")
        if not overwrite:
            raise WriteError(f"{path}: exists (pass --overwrite, or overwrite=True, to replace it)")
    else:
        if not stat.S_ISDIR(mode):
            raise WriteError(f"{path}: exists and is not a directory")
        if any(path.iterdir()) and not overwrite:
            raise WriteError(f"{path}: directory is not empty (pass --overwrite, or overwrite=True, to replace it whole)")
    return path


def probe_output(path, what="output", kind="file", overwrite=True, inside=False):
    """Check before any work that `path` can really be written, by doing it: check_output_path, then
    create the directory that will hold it (its parent; with `inside`, a directory `path` itself,
    for outputs written into it) and a temporary file in it, removed at once. Catches what the
    permission bits do not tell (a parent that cannot be created, /proc, a read-only mount, root's
    access). Raises WriteError naming `what` (e.g. "--json") and the path, in one line; returns
    the path."""
    path = Path(path)
    try:
        check_output_path(path, kind, overwrite)
        where = path if kind == "dir" and inside else path.parent
        where.mkdir(parents=True, exist_ok=True)
        probe = temp_path(where / "probe")
        probe.touch(exist_ok=False)
        probe.unlink()
    except WriteError as e:
        raise WriteError(f"{what} {first_line(e)}") from None
    except OSError as e:
        where = f": {e.filename}" if e.filename and str(e.filename) != str(path) else ""
        raise WriteError(f"{what} {path}: cannot be written ({e.strerror or first_line(e)}{where})") from None
    return path


def format_bytes(n):
    """677370000 -> '677.37 MB' (decimal units, as disk sizes are given)."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"


def check_free_space(path, need, what="the output"):
    """Refuse before writing when the file system holding `path` has less than `need` bytes free."""
    free = shutil.disk_usage(_existing_ancestor(Path(path) / "x")).free
    if need * 1.02 + (64 << 20) > free:
        raise WriteError(f"{path}: {what} needs {need / 1e9:.1f} GB of disk, {free / 1e9:.1f} GB free")


# ---------------------------------------------------------------------------------------------
# Atomic writes

def temp_path(path):
    """A temporary beside `path` that names its writer: .<name>.tmp-<pid>-<random>."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(3)}")


_TEMP = re.compile(r"^\.(?P<name>.+)\.tmp-?(?P<pid>\d+)(-\w+)?$")


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale_temps(path):
    """Remove temporaries for `path` (files or directories) left by writers that no longer run."""
    path = Path(path)
    try:
        entries = list(path.parent.iterdir())
    except OSError:
        return []
    removed = []
    for entry in entries:
        m = _TEMP.match(entry.name)
        if not m or m["name"] != path.name or _alive(int(m["pid"])):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry)
    return removed


def umask():
    """The process umask (read from /proc where possible: setting it to read it races with threads)."""
    try:
        for line in open("/proc/self/status"):
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _fsync(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove(path):
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink(missing_ok=True)


def _write_failed(path, e):
    if isinstance(e, WriteError):
        return e
    if isinstance(e, OSError) and e.errno == errno.ENOSPC or "write failed" in str(e) or "No space" in str(e):
        return WriteError(f"{path}: disk full while writing ({first_line(e)})")
    return WriteError(f"{path}: write failed ({first_line(e)})")


def _prepare(path, kind, overwrite, need):
    """What every atomic write does first: check the destination, make its directory, clean the
    temporaries of dead writers, check the free space -> (path, a fresh temporary beside it)."""
    path = check_output_path(path, kind, overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temps(path)
    if need is not None:
        check_free_space(path.parent, need)
    return path, temp_path(path)


class _Terminated(BaseException):
    """SIGTERM/SIGHUP arrived while a temporary was being written (raised to unwind its cleanup)."""


@contextlib.contextmanager
def _signals_unwind():
    """While a temporary is written, SIGTERM and SIGHUP that would kill the process outright (their
    default action) instead raise, so the writer's `finally` removes the temporary; the signal is
    then delivered again with its default action, so the process still ends as killed by it.
    Handlers the program installed itself (or SIG_IGN) are left alone, as is every thread but the
    main one."""
    main = threading.current_thread() is threading.main_thread()
    signals = [s for s in (signal.SIGTERM, signal.SIGHUP) if main and signal.getsignal(s) is signal.SIG_DFL]

    def unwind(signum, frame):
        raise _Terminated(signum)
    for s in signals:
        signal.signal(s, unwind)
    try:
        yield
    except _Terminated as t:
        for s in signals:
            signal.signal(s, signal.SIG_DFL)
        os.kill(os.getpid(), t.args[0])
        raise SystemExit(128 + t.args[0]) from None         # not reached: the default action kills
    finally:
        for s in signals:
            signal.signal(s, signal.SIG_DFL)


def atomic_write(path, write, overwrite=True, need=None):
    """write(tmp) fills a temporary beside `path`, which then replaces `path` in one rename: a reader
    sees the old file or the whole new one, never a part. The file gets the umask's usual mode.
    Returns `path`; raises WriteError (nothing left behind) when the path or the disk refuses."""
    path, tmp = _prepare(path, "file", overwrite, need)
    with _signals_unwind():
        try:
            write(tmp)
            os.chmod(tmp, 0o666 & ~umask())         # some writers (safetensors) create files 0600
            _fsync(tmp)
            os.replace(tmp, path)
            _fsync(path.parent)
        except (OSError, RuntimeError) as e:
            raise _write_failed(path, e) from None
        finally:
            _remove(tmp)
    return path


def atomic_dir(path, fill, overwrite=False, need=None):
    """fill(tmp_dir) writes a whole directory beside `path`, which then replaces `path` as one set
    (an existing directory is moved aside first, so old and new files never mix). Returns `path`."""
    path, tmp = _prepare(path, "dir", overwrite, need)
    with _signals_unwind():
        try:
            tmp.mkdir()
            fill(tmp)
            os.chmod(tmp, 0o777 & ~umask())
            for f in tmp.iterdir():
                os.chmod(f, 0o666 & ~umask())
                _fsync(f)
            replace_dir(tmp, path)
        except (OSError, RuntimeError) as e:
            raise _write_failed(path, e) from None
        finally:
            _remove(tmp)
    return path


def replace_dir(new, path):
    """Rename directory `new` to `path`, moving an existing `path` aside (and deleting it) first."""
    try:
        os.rename(new, path)                    # absent or empty destination
    except OSError as e:
        if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
            raise
        old = temp_path(path)
        os.rename(path, old)
        try:
            os.rename(new, path)
        except OSError:
            os.rename(old, path)
            raise
        shutil.rmtree(old, ignore_errors=True)
    _fsync(Path(path).parent)


# ---------------------------------------------------------------------------------------------
# Reading checkpoints

def read_json(f):
    """A JSON object from a regular file (config.json, *.index.json) -> dict, or CheckpointError."""
    f = regular_file(f)
    try:
        d = json.loads(f.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{f}: invalid JSON ({first_line(e)})") from None
    except OSError as e:
        raise CheckpointError(f"{f}: cannot read ({first_line(e)})") from None
    if not isinstance(d, dict):
        raise CheckpointError(f"{f}: expected a JSON object, got {type(d).__name__}")
    return d


def read_config_json(path):
    """<checkpoint directory>/config.json -> dict, or CheckpointError."""
    f = Path(path) / "config.json"
    if not (f.exists() or f.is_symlink()):
        raise CheckpointError(f"{f}: missing (a checkpoint directory needs config.json)")
    return read_json(f)


def weight_files(path):
    """The weight files of a Hugging Face checkpoint directory (the shards of an index, or the one file)."""
    path = Path(path)
    for index in INDEX_FILES:
        if (path / index).exists():
            weight_map = read_json(path / index).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map or \
                    not all(isinstance(v, str) and v and "/" not in v and v not in (".", "..") for v in weight_map.values()):
                raise CheckpointError(f"{path / index}: not a valid index, needs a 'weight_map' of key -> shard file name")
            files = sorted({path / name for name in weight_map.values()})
            for f in files:
                if not f.exists():
                    raise CheckpointError(f"{f}: shard listed in {index} is missing")
                regular_file(f)
            return files
    for single in SINGLE_FILES:
        if (path / single).exists():
            return [regular_file(path / single)]
    raise CheckpointError(f"{path}: no model.safetensors, pytorch_model.bin or *.index.json found")


def dimension_problem(key, value):
    """None when a model dimension (a DIMENSION_LIMITS key) is within its bound, else what is wrong."""
    limit = DIMENSION_LIMITS[key]
    if value > limit:
        return f"{key} {value} is above {limit}, far beyond any real model (a corrupt or crafted file?)"
    return None


def _open_safetensors(f):
    from safetensors import SafetensorError, safe_open
    try:
        handle = safe_open(str(f), framework="pt", device="cpu")                # memory-mapped
        meta = {k: handle.get_slice(k) for k in handle.keys()}
        meta = {k: (tuple(s.get_shape()), s.get_dtype()) for k, s in meta.items()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        if "invalid offset" in str(e):          # the header's tensors overlap or leave a gap: not truncation
            raise CheckpointError(f"{f}: corrupt safetensors header: tensor byte ranges overlap or leave "
                                  f"gaps ({first_line(e)})") from None
        raise CheckpointError(f"{f}: truncated or not a safetensors file ({first_line(e)})") from None
    return {k: (shape, SAFETENSORS_DTYPES.get(dt, dt), lambda k=k: handle.get_tensor(k))
            for k, (shape, dt) in meta.items()}


def load_pth(f):
    """torch.load with weights_only=True (no pickled code runs) and mmap=True -> the loaded object."""
    try:
        return torch.load(f, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"{f}: refused to unpickle: it holds objects other than tensors, possibly "
                              f"code (only weights_only=True loads are done): {first_line(e)}") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as e:
        kind = "PyTorch checkpoint" if Path(f).suffix == ".bin" else "checkpoint"       # .bin: HF's name for it
        raise CheckpointError(f"{f}: truncated or not a {kind} ({first_line(e)})") from None


def _open_pth(f):
    sd = load_pth(f)
    if not isinstance(sd, dict):
        raise CheckpointError(f"{f}: holds a {type(sd).__name__}, expected a dict of tensors")
    if isinstance(sd.get("state_dict"), dict):
        sd = sd["state_dict"]
    for k, t in sd.items():
        if not isinstance(k, str):
            raise CheckpointError(f"{f}: key {k!r} is a {type(k).__name__}, expected a string")
        if not isinstance(t, torch.Tensor):
            raise CheckpointError(f"{f}: key {k!r} holds a {type(t).__name__}, expected a tensor")
        if t.layout != torch.strided:
            raise CheckpointError(f"{f}: key {k!r} is a {t.layout} tensor; only dense tensors are supported")
        if t.device.type != "cpu":                  # map_location="cpu" moves all but meta tensors
            raise CheckpointError(f"{f}: key {k!r}: unsupported device {str(t.device)!r}: use cpu or cuda "
                                  f"(a {t.device.type} tensor holds no values)")
        problem = storage_problem(t)
        if problem:
            raise CheckpointError(f"{f}: key {k!r} {problem}")
    return {k: (tuple(t.shape), t.dtype, lambda t=t: t) for k, t in sd.items()}


def storage_problem(t):
    """None when `t`'s elements are distinct places of its storage, else what is wrong. Metadata
    only: a view that repeats values (stride 0, overlapping strides) can declare far more elements
    than its file holds, and checking its values would then take hours; no checkpoint holds one.
    (torch.load already bounds each storage by its record in the file, and each view by its storage.)"""
    inner = 1                       # 1 + the farthest offset the inner dimensions reach
    for stride, size in sorted((d, s) for s, d in zip(t.shape, t.stride()) if s > 1):
        if stride < inner:
            return (f"declares shape {list(t.shape)} with strides {list(t.stride())} ({t.numel():,} values) over "
                    f"a storage of {t.untyped_storage().nbytes():,} bytes: a view that repeats values, not a "
                    f"checkpoint tensor")
        inner += (size - 1) * stride
    return None


def open_weights(f):
    """One weight file -> {key: (shape, dtype, fetch)} without reading tensor data. dtype is a torch
    dtype, or the safetensors name of one torch cannot hold (e.g. "F8_E4M3")."""
    f = regular_file(f)
    return _open_safetensors(f) if f.suffix == ".safetensors" else _open_pth(f)


def dtype_problem(dtype):
    """None for a supported weight dtype, else what is wrong with it (a phrase: 'has ...')."""
    if dtype in WEIGHT_DTYPES:
        return None
    floating = dtype.is_floating_point if isinstance(dtype, torch.dtype) else str(dtype).startswith(("F", "f"))
    if floating:
        return f"has dtype {dtype}, which is not supported (use float32, float16, bfloat16 or float64)"
    if isinstance(dtype, torch.dtype):
        return f"has dtype {dtype}, expected a floating-point tensor"
    return f"has non-float dtype {dtype}"


def value_problem(t, limit=MAX_ABS_WEIGHT, chunk=1 << 24):
    """None when every value of `t` is finite with |value| <= limit, else what is wrong. One pass,
    in chunks (a memory-mapped tensor is not copied)."""
    flat = t.reshape(-1)
    worst = 0.0
    for i in range(0, flat.numel(), chunk):
        lo, hi = torch.aminmax(flat[i:i + chunk])
        lo, hi = float(lo), float(hi)
        if not (math.isfinite(lo) and math.isfinite(hi)):
            return "contains NaN or Inf"
        worst = max(worst, -lo, hi)
    if worst > limit:
        return f"has a value of magnitude {worst:.3g}, above {limit:g} (not a trained model's weights; it overflows float16)"
    return None


# ---------------------------------------------------------------------------------------------
# Writing

def write_safetensors(f, shapes, make_rows, dtype, metadata=None, chunk=1 << 24):
    """Write a safetensors file tensor by tensor (and large tensors in row blocks), never holding more
    than one block in memory. make_rows(key, shape, rows) -> the next `rows` rows as float32."""
    names = sorted(shapes)
    size = dtype.itemsize
    header, offset = {}, 0
    for k in names:
        n = math.prod(shapes[k]) * size
        header[k] = {"dtype": SAFETENSORS_NAMES[dtype], "shape": list(shapes[k]), "data_offsets": [offset, offset + n]}
        offset += n
    header["__metadata__"] = dict(metadata or {}, format="pt")
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)                                  # 8-byte aligned data
    with open(f, "wb") as out:
        out.write(struct.pack("<Q", len(blob)))
        out.write(blob)
        for k in names:
            shape = shapes[k]
            row = math.prod(shape[1:])
            step = max(1, chunk // max(row, 1))
            for start in range(0, shape[0], step):
                block = make_rows(k, shape, min(step, shape[0] - start)).to(dtype).contiguous()
                out.write(block.view(torch.uint8).numpy().data)


# ---------------------------------------------------------------------------------------------
# Dropping the pages of memory-mapped checkpoint tensors from this process's resident set

def _tensors_in(obj, depth=5):
    """Every tensor reachable from obj through attributes, lists, tuples and dicts (a few levels)."""
    if isinstance(obj, torch.Tensor):
        return [obj]
    if depth == 0:
        return []
    if isinstance(obj, dict):
        items = obj.values()
    elif isinstance(obj, (list, tuple)):
        items = obj
    elif hasattr(obj, "__dict__"):
        items = vars(obj).values()
    else:
        return []
    return [t for item in items for t in _tensors_in(item, depth - 1)]


def _private_file_maps():
    """(start, end) of this process's private file-backed mappings (a memory-mapped checkpoint)."""
    spans = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        parts = line.split()
        if len(parts) >= 6 and parts[1][3] == "p" and parts[5].startswith("/"):
            a, b = (int(x, 16) for x in parts[0].split("-"))
            spans.append((a, b))
    return spans


def private_file_maps():
    """(start, end) of this process's private file-backed mappings; [] where not Linux."""
    return _private_file_maps() if sys.platform.startswith("linux") else []


def in_maps(t, maps):
    """Whether CPU tensor t lies wholly inside one of `maps` (private_file_maps())."""
    if t.device.type != "cpu" or t.numel() == 0:
        return False
    start = t.data_ptr()
    end = start + t.numel() * t.element_size()
    return any(a <= start and end <= b for a, b in maps)


def in_file_mapping(t):
    """Whether CPU tensor t lies wholly inside one private file mapping (a memory-mapped checkpoint).
    Linux only (False elsewhere)."""
    return in_maps(t, private_file_maps())


def _whole_pages(t):
    """(a, b): the whole pages inside CPU tensor t's bytes (b <= a when there are none)."""
    import mmap
    start = t.data_ptr()
    end = start + t.numel() * t.element_size()
    return -(-start // mmap.PAGESIZE) * mmap.PAGESIZE, end // mmap.PAGESIZE * mmap.PAGESIZE


def _madvise(a, b, advice):
    """madvise(advice) on the page range [a, b) -> whether it succeeded."""
    import ctypes
    madvise = ctypes.CDLL(None, use_errno=True).madvise
    return madvise(ctypes.c_void_p(a), ctypes.c_size_t(b - a), advice) == 0


def _dontneed(a, b):
    """madvise(MADV_DONTNEED) on [a, b) -> the bytes dropped (0 if none or it failed)."""
    return b - a if b > a and _madvise(a, b, 4) else 0                     # 4: MADV_DONTNEED


def populate(t):
    """madvise(MADV_POPULATE_READ) on CPU tensor t's whole pages: map a memory-mapped tensor's pages in
    one call before it is read through (copying 1b5's matrices out of the mapping: 1.2 -> 3.7 GB/s,
    where each page was faulted in on first touch). Returns whether it was done (Linux 5.14 and later)."""
    if not sys.platform.startswith("linux") or t.device.type != "cpu":
        return False
    a, b = _whole_pages(t)
    return b > a and _madvise(a, b, 22)                                     # 22: MADV_POPULATE_READ


def page_dropper(t):
    """-> a function that drops the resident pages of slices of `t` (as `release_pages` does), with
    /proc/self/maps read once here rather than once per slice: the quantisers call it after every
    slice of ~1 MB, hundreds of times per matrix. A no-op function when `t` is not contiguous or not
    wholly inside a private file mapping (a tensor in the heap must keep its pages). Linux only."""
    if not t.is_contiguous() or not in_file_mapping(t):
        return lambda part: 0
    lo, hi = t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()

    def drop(part):
        if not (lo <= part.data_ptr() and part.data_ptr() + part.numel() * part.element_size() <= hi):
            raise ValueError("page_dropper: a slice outside the tensor it was made for")
        return _dontneed(*_whole_pages(part))
    return drop


def release_pages(tensors, keep=None):
    """Drop the resident pages of memory-mapped checkpoint tensors the model did not keep (e.g. the
    raw embedding, which the model holds with ln0 applied): otherwise they stay in the process's RSS
    for as long as any tensor of the same file is alive. Only pages of private file mappings are
    dropped (madvise MADV_DONTNEED: if touched again they are re-read from the file, unchanged),
    and never a page that overlaps a tensor reachable from `keep` (the model). Linux only."""
    if not sys.platform.startswith("linux"):
        return 0
    span = lambda t: (t.data_ptr(), t.data_ptr() + t.numel() * t.element_size())
    kept = [span(t) for t in _tensors_in(keep) if t.device.type == "cpu"] if keep is not None else []
    files = _private_file_maps()
    released = 0
    for t in tensors:
        if not isinstance(t, torch.Tensor) or t.device.type != "cpu":
            continue
        a, b = _whole_pages(t)
        if b <= a or any(s < b and a < e for s, e in kept):
            continue
        if not any(s <= a and b <= e for s, e in files):
            continue
        released += _dontneed(a, b)
    return released
