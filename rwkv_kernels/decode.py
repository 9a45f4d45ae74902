"""One decode step (token mode) through a run of RWKV-4 layers: `decode_layers`.

Two implementations of one signature, chosen by `rwkv_kernels.dispatch` (op "decode_layers"):
  * "composed": the step written as the model's ops (`ln_shift_mix`, `linear_group`,
    `wkv_step_gated`, `linear_accumulate_`, `relu_square_`, `add_gated_`), each of which is
    dispatched on its own: runs on every device and dtype, and is the reference.
  * "c": the same step as one call into the C library (`csrc/decode_step.h`): the same kernels in
    the same order, so bit-identical to "composed" on the C path, without ~90 Python-level calls
    per token (which cost more than reading Q8_0 weights at 169m). CPU, float32 activations and
    state, any weight format of `rwkv_kernels.quant`, contiguous tensors.
The table decides: its "c" rows are those of the formats with a C code (`rwkv_kernels.formats`); forcing
any of the component ops (`dispatch.force(linear=...)`, or a `wkv_backend`) selects "composed"
(`dispatch.COMPOSED_OF`), so a forced implementation is never bypassed; layers the C plan cannot take
(e.g. a non-contiguous weight) take the row's fallback, with one warning.

A layer is any object with the attributes named in VECTORS and MATRICES (the model's `Block`).
"""
import ctypes
import operator

import torch

from . import cpu_c, dispatch, formats
from .fused import add_gated_, ln_shift_mix, relu_square_, wkv_step_gated
from .linear import linear, linear_accumulate_, linear_group

VECTORS = ("ln1_w", "ln1_b", "att_mix_k", "att_mix_v", "att_mix_r", "att_w", "att_u",
           "ln2_w", "ln2_b", "ffn_mix_k", "ffn_mix_r")
MATRICES = ("att_receptance", "att_key", "att_value", "att_output", "ffn_receptance", "ffn_key", "ffn_value")
_NAMES = VECTORS + MATRICES
_NAMES_OF = operator.attrgetter(*_NAMES)
_I64, _VP = ctypes.c_int64, ctypes.c_void_p


class DecodeLayers:
    """A run of layers prepared for `decode_layers`: the C plan (flat pointer and shape arrays) is
    built on first use and kept, as are references to every tensor it points into."""

    def __init__(self, layers, n_embd, eps, rescale_every=0, layer0=0):
        self.layers, self.C, self.eps = list(layers), n_embd, eps
        self.rescale_every, self.layer0 = rescale_every, layer0
        self.F = self.layers[0].ffn_key.shape[0] if self.layers else 0
        self._plan = self._held = self.unusable = None

    def weight_format(self):
        return dispatch.format_name(self.layers[0].att_key) if self.layers else "float32"

    def c_plan(self):
        """(pointers, shapes) for the C step; rebuilt if a layer's tensor was replaced since (the plan
        holds the tensors it points into, so none is freed under it). ValueError if a layer does not fit."""
        if self._plan is None or not self._current():
            self._plan = _build_plan(self.layers, self.C, self.F)
            self._held = [_NAMES_OF(blk) for blk in self.layers]
        return self._plan

    def _current(self):
        """Whether every layer still holds the tensors the plan points into (one C-level pass per layer)."""
        return all(all(map(operator.is_, _NAMES_OF(blk), held)) for blk, held in zip(self.layers, self._held))

    def c_usable(self):
        """Whether the C step can run these layers (else `unusable` says why; the composed ops run)."""
        try:
            self.c_plan()
        except ValueError as e:
            self.unusable = str(e)
            return False
        return True


def _build_plan(layers, C, F):
    ptrs, dims = [], []
    want = {"att_receptance": (C, C), "att_key": (C, C), "att_value": (C, C), "att_output": (C, C),
            "ffn_receptance": (C, C), "ffn_key": (F, C), "ffn_value": (C, F)}
    for i, blk in enumerate(layers):
        for name in VECTORS:
            t = getattr(blk, name)
            if t.dtype != torch.float32 or not t.is_contiguous() or t.numel() != C:
                raise ValueError(f"decode_layers: layer {i} {name} must be float32 contiguous [{C}]")
            ptrs.append(t.data_ptr())
        for name in MATRICES:
            w = getattr(blk, name)
            fmt = formats.of(w)
            if tuple(w.shape) != want[name] or fmt is None or fmt.code is None:
                raise ValueError(f"decode_layers: layer {i} {name} is {dispatch.format_name(w)} {list(w.shape)}, "
                                 f"expected one of {sorted(formats.c_codes())} {list(want[name])}")
            parts = (*fmt.c_parts(w), None, None, None, None)[:5]   # values, scales, [qh, m, col]
            if not all(t is None or t.is_contiguous() for t in parts):
                raise ValueError(f"decode_layers: layer {i} {name} is not contiguous")
            ptrs += tuple(None if t is None else t.data_ptr() for t in parts)
            dims += (fmt.code, *want[name])
    lib = cpu_c.ops().lib
    assert lib.decode_layout(0) * len(layers) == len(ptrs) and lib.decode_layout(1) * len(layers) == len(dims)
    return (_VP * len(ptrs))(*ptrs), (_I64 * len(dims))(*dims)


def _key(plan, x, state):
    tensors = (x, *state)
    return (dispatch.device_of(*tensors), dispatch.compute_of(*tensors), plan.weight_format(),
            dispatch.layout_of(*tensors))


def decode_layers(plan, x, state, wkv_backend=None, backend=None):
    """x (B, C): one token per stream, updated in place and returned; state: the tensors
    (att_x, att_a, att_b, att_p, ffn_x), each (n_layers, B, C), updated in place."""
    name, fn = dispatch.pick("decode_layers", _key(plan, x, state), backend, parts_chosen=wkv_backend is not None)
    return fn(plan, x, state, wkv_backend)


def decode_layers_c(plan, x, state, wkv_backend=None, isa=None):
    """isa: the instruction-set build to run (default: the best here). Layers the C step cannot take
    (e.g. a non-contiguous weight: `plan.unusable` says why) run the table's fallback for them (the
    composed ops: right, only slower), with one warning per process."""
    if not plan.c_usable():                      # checks (and builds) the plan once per step
        _, fallback = dispatch.fall_back("decode_layers", _key(plan, x, state), plan.unusable)
        return fallback(plan, x, state, wkv_backend)
    ptrs, dims = plan._plan
    att_x, att_a, att_b, att_p, ffn_x = state
    B = x.shape[0]
    rc = cpu_c.ops(isa).lib.decode_layers(len(plan.layers), dims, ptrs, x.data_ptr(), att_x.data_ptr(),
                                       att_a.data_ptr(), att_b.data_ptr(), att_p.data_ptr(), ffn_x.data_ptr(),
                                       B, plan.C, plan.F, plan.eps, plan.rescale_every, plan.layer0,
                                       torch.get_num_threads())
    if rc != 0:
        raise MemoryError(f"decode_layers: cannot allocate scratch for {B} streams")
    return x


def decode_layers_composed(plan, x, state, wkv_backend=None):
    att_x, att_a, att_b, att_p, ffn_x = state
    for i, blk in enumerate(plan.layers):
        kx, vx, rx = ln_shift_mix(x, blk.ln1_w, blk.ln1_b, plan.eps, att_x[i],
                                  (blk.att_mix_k, blk.att_mix_v, blk.att_mix_r))
        r, k, v = linear_group((rx, blk.att_receptance), (kx, blk.att_key), (vx, blk.att_value))
        rwkv = wkv_step_gated(blk.att_w, blk.att_u, r, k.float(), v.float(), att_a[i], att_b[i], att_p[i],
                              backend=wkv_backend).to(x.dtype)
        linear_accumulate_(rwkv, blk.att_output, x)                 # x += rwkv W_o^T
        kx, rx = ln_shift_mix(x, blk.ln2_w, blk.ln2_b, plan.eps, ffn_x[i], (blk.ffn_mix_k, blk.ffn_mix_r))
        r, k = linear_group((rx, blk.ffn_receptance), (kx, blk.ffn_key))
        add_gated_(x, r, linear(relu_square_(k), blk.ffn_value))
        if plan.rescale_every and (plan.layer0 + i + 1) % plan.rescale_every == 0:
            x = x / 2
    return x


dispatch.register_impl("decode_layers", "c", decode_layers_c, needs_c=True)
dispatch.register_impl("decode_layers", "composed", decode_layers_composed)
