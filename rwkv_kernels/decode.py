"""One decode step (token mode) through a run of RWKV-4 layers: `decode_layers`; several tokens per
stream (sequence mode): `sequence_layers`.

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

`sequence_layers` (op "sequence_layers") runs T tokens per stream through the layers: "c" (one C call,
`sequence_layers` in csrc/decode_step.h) gives each token a decode step's element-wise work in its
stream's order and runs the products over all B * T rows at once on the decode kernels (which compute
each row alone), so its result is that of T decode steps bit for bit; the table takes it for "short"
sequences (at most `dispatch.short_rows(format)` rows, or any within `dispatch.rows_independent()`, the
server's prefill), in calls of at most STEP_ROWS rows. "composed" is the model's ops on whole sequences
(a GEMM past the format's short rows, one WKV scan per layer), for
longer prompts, other devices and dtypes, and whenever a part is forced.

`decode_token` (op "decode_token") is a whole model's token step, tokens in, logits out: the embedding
rows, `decode_layers`, the final LayerNorm (`ln_shift_mix` with no mixes: its LayerNorm alone) and the
head's product; "c" runs it as one C call (`decode_token` in csrc/decode_step.h: the same kernels, so the
same bits as "composed", which runs those four steps as the model's ops). It is chosen and forced as
`decode_layers` is, and forcing `decode_layers` itself selects "composed" too.
"""
import ctypes
import operator

import torch
import torch.nn.functional as F

from . import cpu_c, dispatch, formats
from .fused import add_gated_, ln_shift_mix, relu_square_, wkv_step_gated
from .linear import linear, linear_accumulate_, linear_group
from .wkv_ops import wkv

VECTORS = ("ln1_w", "ln1_b", "att_mix_k", "att_mix_v", "att_mix_r", "att_w", "att_u",
           "ln2_w", "ln2_b", "ffn_mix_k", "ffn_mix_r")
MATRICES = ("att_receptance", "att_key", "att_value", "att_output", "ffn_receptance", "ffn_key", "ffn_value")
_NAMES = VECTORS + MATRICES
_NAMES_OF = operator.attrgetter(*_NAMES)
_I64, _VP = ctypes.c_int64, ctypes.c_void_p


def _plan_usable(obj):
    """Whether obj.c_plan() builds; if not, obj.unusable says why."""
    try:
        obj.c_plan()
    except ValueError as e:
        obj.unusable = str(e)
        return False
    return True


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
        return _plan_usable(self)


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


# -- several tokens per stream through a run of layers (sequence mode) --------------------------------

def _sequence_key(plan, x, state):
    tensors = (x, *state)
    fmt = plan.weight_format()
    return dispatch.device_of(*tensors), dispatch.compute_of(*tensors), fmt, dispatch.product_shape(x, fmt)


def sequence_layers(plan, x, state, wkv_backend=None, backend=None):
    """T tokens per stream through the layers of `plan` (a DecodeLayers): x (B, T, C) in the compute
    dtype; state (att_x, att_a, att_b, att_p, ffn_x), each (n_layers, B, C), updated in place (the
    token shift takes position -1 from it). Returns x after the layers, (B, T, C)."""
    name, fn = dispatch.pick("sequence_layers", _sequence_key(plan, x, state), backend,
                             parts_chosen=wkv_backend is not None)
    return fn(plan, x, state, wkv_backend)


# The C step runs a long sequence in calls of at most this many rows (streams x tokens): its products
# compute each row alone, so the bits do not depend on it, but past ~100 rows the rows' activations
# fall out of the L2 cache and every row costs more (`python -m bench.modes --chunks`, 169m int8, Intel
# Xeon 512-bit build, 2026-12-07: 0.65 ms a row at 48-128 rows, 0.72 at 384, 0.86 at 512).
STEP_ROWS = 64


def sequence_layers_c(plan, x, state, wkv_backend=None, isa=None):
    """The layers as one C call (`sequence_layers` in csrc/decode_step.h): each token gets exactly the
    work of a decode step, the products over all B * T rows at once (the decode kernels compute each row
    alone), so the result is bit for bit that of T `decode_layers` steps. The table takes it for "short"
    sequences (at most `dispatch.short_rows(format)` rows, or any within `dispatch.rows_independent()`):
    past them the composed implementation's GEMM is faster (each record's crossover, per build: 48 rows
    for float32, 64-192 for the packed formats on AVX2, none for int8 on the 512-bit build, whose VNNI
    products beat the GEMM at every length; docs/results.md, Prompts). A sequence of more than STEP_ROWS
    rows runs in calls of STEP_ROWS rows (whole tokens per stream), the state carried."""
    B, T, C = x.shape
    if not plan.c_usable():
        _, fallback = dispatch.fall_back("sequence_layers", _sequence_key(plan, x, state), plan.unusable)
        return fallback(plan, x, state, wkv_backend)
    if dispatch.layout_of(*state) != "contiguous":       # rows of a larger state (a pipeline's micro-batch)
        rows = tuple(t.contiguous() for t in state)
        x = sequence_layers_c(plan, x, rows, wkv_backend, isa)
        for t, r in zip(state, rows):
            t.copy_(r)
        return x
    step = max(1, STEP_ROWS // B)                              # tokens per stream in one C call
    if T > step:                                               # in turn, the state carried: the same bits
        out = torch.empty(B, T, C, dtype=x.dtype)
        for t in range(0, T, step):
            out[:, t:t + step] = sequence_layers_c(plan, x[:, t:t + step], state, wkv_backend, isa)
        return out
    x = x.contiguous().clone()                                 # updated in place by the C call
    ptrs, dims = plan._plan
    att_x, att_a, att_b, att_p, ffn_x = state
    rc = cpu_c.ops(isa).lib.sequence_layers(len(plan.layers), dims, ptrs, x.data_ptr(), att_x.data_ptr(),
                                            att_a.data_ptr(), att_b.data_ptr(), att_p.data_ptr(), ffn_x.data_ptr(),
                                            B, T, C, plan.F, plan.eps, plan.rescale_every, plan.layer0,
                                            torch.get_num_threads())
    if rc != 0:
        raise MemoryError(f"sequence_layers: cannot allocate scratch for {B} x {T} tokens")
    return x


def sequence_layers_composed(plan, x, state, wkv_backend=None):
    """The layers as the model's ops on whole sequences: matrix-matrix products (`linear_group`, whose
    table row for the shape picks the decode kernels or the GEMM) and one WKV scan over time per layer."""
    att_x, att_a, att_b, att_p, ffn_x = state
    for i, blk in enumerate(plan.layers):
        x = _sequence_block(x, blk, plan.eps, i, att_x, att_a, att_b, att_p, ffn_x, wkv_backend)
        if plan.rescale_every and (plan.layer0 + i + 1) % plan.rescale_every == 0:
            x = x / 2
    return x


def _sequence_block(x, blk, eps, i, att_x, att_a, att_b, att_p, ffn_x, wkv_backend):
    """T tokens per stream: x (B, T, C); the token shift takes position -1 from the state (layer i)."""
    C = x.shape[-1]
    xx = F.layer_norm(x, (C,), blk.ln1_w, blk.ln1_b, eps)
    sx = torch.cat([att_x[i][:, None], xx[:, :-1]], dim=1)          # (B, T, C) shifted by one
    kx = torch.lerp(sx, xx, blk.att_mix_k)
    vx = torch.lerp(sx, xx, blk.att_mix_v)
    rx = torch.lerp(sx, xx, blk.att_mix_r)
    att_x[i] = xx[:, -1]
    r, k, v = linear_group((rx, blk.att_receptance), (kx, blk.att_key), (vx, blk.att_value))
    r, k, v = torch.sigmoid(r), k.float(), v.float()
    y, (a, b, p) = wkv(blk.att_w, blk.att_u, k, v, (att_a[i], att_b[i], att_p[i]), wkv_backend)
    att_a[i], att_b[i], att_p[i] = a, b, p
    x = x + linear(r * y.to(x.dtype), blk.att_output)

    xx = F.layer_norm(x, (C,), blk.ln2_w, blk.ln2_b, eps)
    sx = torch.cat([ffn_x[i][:, None], xx[:, :-1]], dim=1)
    kx = torch.lerp(sx, xx, blk.ffn_mix_k)
    rx = torch.lerp(sx, xx, blk.ffn_mix_r)
    ffn_x[i] = xx[:, -1]
    r, k = linear_group((rx, blk.ffn_receptance), (kx, blk.ffn_key))
    r, k = torch.sigmoid(r), torch.square(torch.relu(k))
    return x + r * linear(k, blk.ffn_value)


dispatch.register_impl("sequence_layers", "c", sequence_layers_c, needs_c=True)
dispatch.register_impl("sequence_layers", "composed", sequence_layers_composed)


# -- a whole model's token step ---------------------------------------------------------------------

HEAD = ("emb", "ln_out_w", "ln_out_b", "head")
EMB_TABLE, EMB_LN0, EMB_GIVEN = 0, 1, 2         # how the C step gets the embedding rows (decode_step.h)


class DecodeModel:
    """A whole model prepared for `decode_token`: `layers` (a DecodeLayers of every layer) and `owner`,
    any object with the attributes in HEAD (the model: the embedding [V, C], the final LayerNorm's
    weight and bias [C], the head [V, C]), read again at each step, so a replaced tensor is never
    bypassed. The embedding is one of:
      * a float32 or 16-bit table, which the C step reads itself;
      * an object with `ln0_parts()` -> (raw [V, C] float32/16-bit table, dtype, weight [C], bias [C],
        eps) whose rows are `layer_norm(raw[ids] rounded to dtype)` rounded to dtype (rwkv_engine's
        lazily normalised table, from the memory map): the C step computes the same rows;
      * anything else indexed like a table (`emb[ids]` -> rows [B, C]), looked up in Python first."""

    def __init__(self, layers, owner):
        self.layers, self.owner = layers, owner
        self._head = self._held = None
        self.unusable = None

    @property
    def vocab_size(self):
        return self.owner.head.shape[0]

    def weight_format(self):
        return self.layers.weight_format()

    def c_plan(self):
        """The head's part of the C plan: (embedding dims, embedding pointers, eps, head dims, head
        pointers), rebuilt when one of the owner's HEAD tensors was replaced. ValueError if one does not fit."""
        held = _HEAD_OF(self.owner)
        if self._head is None or not all(map(operator.is_, held, self._held)):
            self._head, self._held = _build_head(*held, self.layers.C), held
        return self._head

    def c_usable(self):
        """Whether the C step can run this model (else `unusable` says why; the composed ops run)."""
        if not _plan_usable(self):
            return False
        if not self.layers.c_usable():
            self.unusable = self.layers.unusable
            return False
        return True


_HEAD_OF = operator.attrgetter(*HEAD)


def _float_code(t, what, C):
    fmt = formats.of(t) if isinstance(t, torch.Tensor) else None
    if fmt is None or fmt.dtype is None or fmt.code is None or not t.is_contiguous() or t.dim() != 2 or t.shape[1] != C:
        raise ValueError(f"decode_token: {what} must be a contiguous float32, float16 or bfloat16 [V, {C}] table, "
                         f"got {getattr(t, 'dtype', type(t).__name__)} {list(getattr(t, 'shape', ()))}")
    return fmt.code


def _vector(t, what, C):
    if not isinstance(t, torch.Tensor) or t.dtype != torch.float32 or not t.is_contiguous() or t.numel() != C:
        raise ValueError(f"decode_token: {what} must be float32 contiguous [{C}]")
    return t.data_ptr()


def _build_head(emb, ln_w, ln_b, head, C):
    if emb is None or head is None:
        raise ValueError("decode_token: the model holds no embedding or no head (a pipeline stage)")
    if tuple(emb.shape)[1:] != (C,):
        raise ValueError(f"decode_token: the embedding is {list(emb.shape)}, expected [V, {C}]")
    if isinstance(emb, torch.Tensor):
        emb_dims, emb_ptrs, emb_eps = (EMB_TABLE, _float_code(emb, "the embedding", C), 0), (emb.data_ptr(), None, None), 0.0
    elif hasattr(emb, "ln0_parts"):
        raw, dtype, w0, b0, eps0 = emb.ln0_parts()
        pack = formats.get(dispatch.dtype_name(dtype))
        if pack.dtype is None or pack.code is None:
            raise ValueError(f"decode_token: the embedding's rows are {dtype}, not a float format")
        emb_dims = (EMB_LN0, _float_code(raw, "the raw embedding", C), pack.code)
        emb_ptrs = (raw.data_ptr(), _vector(w0, "ln0's weight", C), _vector(b0, "ln0's bias", C))
        emb_eps = float(eps0)
    else:
        emb_dims, emb_ptrs, emb_eps = (EMB_GIVEN, -1, -1), (None, None, None), 0.0
    _vector(ln_w, "ln_out_w", C), _vector(ln_b, "ln_out_b", C)
    fmt_h = formats.of(head)
    if fmt_h is None or fmt_h.code is None or tuple(head.shape) != (emb.shape[0], C):
        raise ValueError(f"decode_token: the head is {dispatch.format_name(head)} {list(head.shape)}, expected one "
                         f"of {sorted(formats.c_codes())} [{emb.shape[0]}, {C}]")
    parts = (*fmt_h.c_parts(head), None, None, None, None)[:5]
    if not all(t is None or t.is_contiguous() for t in parts):
        raise ValueError("decode_token: the head is not contiguous")
    return ((_I64 * 3)(*emb_dims), (_VP * 3)(*emb_ptrs), emb_eps, (_I64 * 3)(fmt_h.code, head.shape[0], C),
            (_VP * 5)(*(None if t is None else t.data_ptr() for t in parts)))


def _token_key(plan, state):
    return (dispatch.device_of(*state), dispatch.compute_of(*state), plan.weight_format(), dispatch.layout_of(*state))


def decode_token(plan, tokens, state, wkv_backend=None, backend=None):
    """tokens: int64 [B, 1] (one token per stream), already a validated batch; state: the tensors
    (att_x, att_a, att_b, att_p, ffn_x), each (n_layers, B, C), updated in place. Returns the logits
    float32 [B, V]. A token outside [0, V) is a ValueError, before anything is changed."""
    name, fn = dispatch.pick("decode_token", _token_key(plan, state), backend, parts_chosen=wkv_backend is not None)
    return fn(plan, tokens, state, wkv_backend)


def _bad_token(tokens, V):
    lo, hi = int(tokens.min()), int(tokens.max())
    return ValueError(f"token id {lo if lo < 0 else hi} out of range [0, {V})")


def _check_ids(tokens, V):
    """The token step's ids check where C does not make it (the composed step, a table looked up in Python)."""
    if bool(((tokens < 0) | (tokens >= V)).any()):
        raise _bad_token(tokens, V)


def embed_rows(emb, ids, dtype):
    """The embedding rows of ids (any shape; a copy, safe to update in place) in the compute dtype."""
    return emb[ids].to(dtype)


def layer_norm(x, w, b, eps):
    """LayerNorm of x [..., C] over its last dimension (a new tensor): `ln_shift_mix` with no mixes, the
    kernel the C token step runs for the final LayerNorm and the lazily normalised embedding."""
    shape = x.shape
    x = x.reshape(-1, shape[-1]).contiguous()
    out = torch.empty_like(x)
    ln_shift_mix(x, w, b, eps, out, ())
    return out.reshape(shape)


def decode_token_c(plan, tokens, state, wkv_backend=None, isa=None):
    if not plan.c_usable():
        _, fallback = dispatch.fall_back("decode_token", _token_key(plan, state), plan.unusable)
        return fallback(plan, tokens, state, wkv_backend)
    if tokens.dtype != torch.int64 or tokens.dim() != 2 or tokens.shape[1] != 1 or not tokens.is_cpu:
        raise ValueError(f"decode_token: tokens must be an int64 [B, 1] CPU tensor, got {tokens.dtype} "
                         f"{list(tokens.shape)} on {tokens.device}")
    if not tokens.is_contiguous():
        tokens = tokens.contiguous()
    emb_dims, emb_ptrs, emb_eps, head_dims, head_ptrs = plan._head
    layers = plan.layers
    ptrs, dims = layers._plan
    att_x, att_a, att_b, att_p, ffn_x = state
    B, V = tokens.shape[0], head_dims[1]
    x = None
    if emb_dims[0] == EMB_GIVEN:                       # a table looked up in Python (see DecodeModel)
        _check_ids(tokens, V)
        x = embed_rows(plan.owner.emb, tokens[:, 0], torch.float32)
        if x.shape != (B, layers.C) or x.dtype != torch.float32 or not x.is_contiguous():
            raise ValueError(f"decode_token: the embedding gave {x.dtype} {list(x.shape)}, expected float32 "
                             f"[{B}, {layers.C}]")
    logits = torch.empty(B, V)
    rc = cpu_c.ops(isa).lib.decode_token(len(layers.layers), dims, ptrs, tokens.data_ptr(), emb_dims, emb_ptrs, emb_eps,
                                         None if x is None else x.data_ptr(),
                                         plan.owner.ln_out_w.data_ptr(), plan.owner.ln_out_b.data_ptr(),
                                         head_dims, head_ptrs, logits.data_ptr(), att_x.data_ptr(), att_a.data_ptr(),
                                         att_b.data_ptr(), att_p.data_ptr(), ffn_x.data_ptr(), B, layers.C, layers.F,
                                         layers.eps, layers.rescale_every, layers.layer0, torch.get_num_threads())
    if rc == -2:
        raise _bad_token(tokens, V)
    if rc == -3:
        raise ValueError(f"decode_token: the C step refused the embedding's description {list(emb_dims)}")
    if rc != 0:
        raise MemoryError(f"decode_token: cannot allocate scratch for {B} streams")
    return logits


def decode_token_composed(plan, tokens, state, wkv_backend=None):
    o = plan.owner
    _check_ids(tokens, o.emb.shape[0])
    x = decode_layers(plan.layers, embed_rows(o.emb, tokens[:, 0], state[0].dtype), state, wkv_backend)
    xn = layer_norm(x, o.ln_out_w, o.ln_out_b, plan.layers.eps)
    return linear(xn[:, None], o.head).float()[:, 0]


dispatch.register_impl("decode_token", "c", decode_token_c, needs_c=True)
dispatch.register_impl("decode_token", "composed", decode_token_composed)
