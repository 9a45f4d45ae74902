"""The recurrent state of an RWKV-4 model for B independent streams."""
import threading
from dataclasses import dataclass, fields
from pathlib import Path

import torch

from rwkv_kernels.wkv_reference import P_INIT

from .files import CheckpointError, atomic_write, first_line, regular_file

WKV_FIELDS = ("att_a", "att_b", "att_p")          # always float32
SHIFT_FIELDS = ("att_x", "ffn_x")                 # the model's dtype
SHIFT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

_CLAIMS = threading.Lock()        # makes a state's check-and-set of "in use" atomic (held for a few bytecodes)


class StateInUseError(ValueError):
    """A state passed to a forward while another forward (another thread) is updating it."""


@dataclass
class State:
    """Per layer: the token-shift inputs of attention and FFN, and the WKV numerator, denominator
    and running max (a, b, p; always float32). Every field is (n_layer, B, C)."""
    att_x: torch.Tensor
    att_a: torch.Tensor
    att_b: torch.Tensor
    att_p: torch.Tensor
    ffn_x: torch.Tensor

    _busy = False           # not a field: True while a forward updates this state (claim/release)

    @classmethod
    def zeros(cls, n_layer, batch_size, n_embd, device="cpu", dtype=torch.float32):
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
        shape = (n_layer, batch_size, n_embd)
        f32 = dict(device=device, dtype=torch.float32)
        return cls(att_x=torch.zeros(shape, device=device, dtype=dtype),
                   att_a=torch.zeros(shape, **f32), att_b=torch.zeros(shape, **f32),
                   att_p=torch.full(shape, P_INIT, **f32),
                   ffn_x=torch.zeros(shape, device=device, dtype=dtype))

    def tensors(self):
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @property
    def batch_size(self):
        return self.att_x.shape[1]

    @property
    def nbytes(self):
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    def __repr__(self):
        """One line: streams, layers, width, dtypes, device, size (never the tensors)."""
        try:
            n_layer, batch, n_embd = self.att_x.shape
            busy = ", in use by a forward" if self._busy else ""
            return (f"State({batch} stream{'s' if batch != 1 else ''}, {n_layer} layers, n_embd {n_embd}, "
                    f"{str(self.att_x.dtype).removeprefix('torch.')} token shift, float32 wkv, "
                    f"{self.att_x.device}, {self.nbytes / 2**20:.2f} MiB{busy})")
        except (AttributeError, TypeError, ValueError):             # a malformed state: check() says what
            return f"State(malformed: att_x is a {type(self.att_x).__name__})"

    def claim(self):
        """Mark the state in use by one forward; raise StateInUseError if another forward holds it
        (two forwards interleaving their in-place updates would both return wrong logits)."""
        with _CLAIMS:
            if self._busy:
                raise StateInUseError(f"state {self!r} is already being updated by another forward: one forward "
                                      "per state at a time (give each thread its own state, e.g. state.clone())")
            self._busy = True
        return self

    def release(self):
        """End `claim`."""
        self._busy = False

    def clone(self):
        """An independent copy (fork a conversation)."""
        return State(**{k: v.clone() for k, v in self.tensors().items()})

    def select(self, streams):
        """A new state holding the given streams (an index or list of indices), in that order."""
        idx = [streams] if isinstance(streams, int) else list(streams)
        for i in idx:
            if not -self.batch_size <= i < self.batch_size:
                raise IndexError(f"stream {i} out of range for a state of {self.batch_size} streams")
        return State(**{k: v[:, idx].clone() for k, v in self.tensors().items()})

    @staticmethod
    def cat(states):
        """Stack the streams of several states into one batch."""
        return State(**{k: torch.cat([getattr(s, k) for s in states], dim=1) for k in states[0].tensors()})

    def reset(self, streams=None):
        """Reset the given streams (default all) to the empty state, in place."""
        sel = slice(None) if streams is None else ([streams] if isinstance(streams, int) else list(streams))
        for name, t in self.tensors().items():
            t[:, sel] = P_INIT if name == "att_p" else 0.0
        return self

    def to(self, device=None, dtype=None):
        """Move; `dtype` applies to the token-shift tensors only (a, b, p stay float32)."""
        out = {}
        for k, v in self.tensors().items():
            out[k] = v.to(device=device, dtype=dtype if k in ("att_x", "ffn_x") and dtype else v.dtype)
        return State(**out)

    def check(self, n_layer, batch_size, n_embd, device, dtype, source="state"):
        """Raise a one-line ValueError unless every field is a (n_layer, batch_size, n_embd) tensor on
        `device`, att_x/ffn_x of the model's `dtype` and att_a/b/p float32. Metadata only: cheap."""
        want = (n_layer, batch_size, n_embd)
        device = device if isinstance(device, torch.device) else torch.device(device)
        try:                                                # the common case, in a few microseconds
            if self.att_x.dtype == self.ffn_x.dtype == dtype and \
                    self.att_a.dtype == self.att_b.dtype == self.att_p.dtype == torch.float32 and \
                    self.att_x.shape == self.ffn_x.shape == self.att_a.shape == self.att_b.shape == \
                    self.att_p.shape == want and \
                    self.att_x.device == self.ffn_x.device == self.att_a.device == self.att_b.device == \
                    self.att_p.device == device:
                return self
        except AttributeError:                              # not tensors: the loop below says which
            pass
        for name, t in self.tensors().items():
            if not isinstance(t, torch.Tensor):
                raise ValueError(f"{source}.{name} is a {type(t).__name__}, expected a tensor")
            if tuple(t.shape) != want:
                raise ValueError(f"{source}.{name} has shape {list(t.shape)}, expected {list(want)} "
                                 f"for {batch_size} streams (n_layer, streams, n_embd)")
            expect = torch.float32 if name in WKV_FIELDS else dtype
            if t.dtype != expect:
                raise ValueError(f"{source}.{name} has dtype {t.dtype}, expected {expect} (a state made for "
                                 f"another model dtype? use model.new_state() or state.to(dtype=...))")
            if t.device.type != device.type or (device.index is not None and t.device.index != device.index):
                raise ValueError(f"{source}.{name} is on {t.device}, the model on {device}")
        return self

    def check_finite(self, source="state"):
        for name, t in self.tensors().items():
            if not bool(torch.isfinite(t).all()):
                raise ValueError(f"{source}.{name} contains NaN or Inf")
        return self

    def save(self, path):
        """Write to a safetensors file, bit-exact and atomically. A symlink, device or directory at
        `path` is refused, not replaced; the file gets the umask's usual mode."""
        from safetensors.torch import save_file
        tensors = {k: v.contiguous().cpu() for k, v in self.tensors().items()}
        atomic_write(path, lambda p: save_file(tensors, str(p), metadata={"format": "rwkv_engine.State"}))

    @classmethod
    def load(cls, path, device="cpu"):
        """Read a state written by `save`: keys, shapes, dtypes and values are checked (one-line ValueError)."""
        from safetensors import safe_open
        path = Path(path)
        if not (path.exists() or path.is_symlink()):
            raise FileNotFoundError(f"{path}: no such state file")
        try:
            regular_file(path, "state file")
            with safe_open(str(path), framework="pt", device=str(device)) as f:
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except CheckpointError as e:
            raise ValueError(str(e)) from None
        except Exception as e:
            raise ValueError(f"{path}: not a saved state ({first_line(e)})") from None
        names = [f.name for f in fields(cls)]
        if sorted(tensors) != sorted(names):
            raise ValueError(f"{path}: state keys {sorted(tensors)} != expected {names}")
        shapes = {tuple(t.shape) for t in tensors.values()}
        if len(shapes) != 1 or len(next(iter(shapes))) != 3:
            raise ValueError(f"{path}: state tensors must all be (n_layer, B, C), got {sorted(shapes)}")
        dtype = tensors["att_x"].dtype
        if dtype not in SHIFT_DTYPES:
            raise ValueError(f"{path}: state.att_x has dtype {dtype}, expected float32, float16 or bfloat16")
        state = cls(**tensors)
        state.check(*next(iter(shapes)), device, dtype, source=str(path))
        return state.check_finite(source=str(path))
