"""y = x W^T for the model's matrices, on the implementation `rwkv_kernels.dispatch` picks.

Every implementation has one signature, `impl(pairs, out=None, accumulate=False)`: pairs
[(x [rows, in], W), ...] with the same rows, returning [y [rows, out], ...] (written into `out` when
given, added to it with `accumulate`). `linear`, `linear_group` and `linear_accumulate_` reshape to
2-D, group the pairs by the implementation the table picks, and call each implementation once.

Implementations here:
  * "c": the C matrix-vector kernel (`cpu_c`, CPU float32 weights), for token mode with any number
    of streams: streams the weights once per call, runs a group of products as one job of its
    thread pool, and is batch invariant (a stream's outputs do not depend on B).
  * "torch": F.linear (a GEMM for prompts; every device and dtype).
  * "reference": the definition, `linear_reference`.
"""
import math

import torch.nn.functional as F

from . import cpu_c, dispatch


def linear_reference(x, weight):
    """x [..., in], weight [out, in] -> [..., out]."""
    return F.linear(x, weight)


def write_outputs(out, ys, accumulate):
    """The implementations' common tail: return ys, or write (add with `accumulate`) them into `out`."""
    if out is None:
        return ys
    for o, y in zip(out, ys):
        o.add_(y) if accumulate else o.copy_(y)
    return out


def linear_torch(pairs, out=None, accumulate=False):
    return write_outputs(out, [F.linear(x, w) for x, w in pairs], accumulate)


def linear_reference_impl(pairs, out=None, accumulate=False):
    return write_outputs(out, [linear_reference(x, w) for x, w in pairs], accumulate)


def linear_c(pairs, out=None, accumulate=False):
    pairs = [(x.contiguous(), w.contiguous()) for x, w in pairs]
    return cpu_c.ops().matvec_group(pairs, out=out, accumulate=accumulate)


dispatch.register_impl("linear", "c", linear_c, needs_c=True)
dispatch.register_impl("linear", "torch", linear_torch)
dispatch.register_impl("linear", "reference", linear_reference_impl)


def _key(x, weight):
    fmt = dispatch.format_name(weight)
    return dispatch.device_of(x, weight), dispatch.dtype_name(x.dtype), fmt, dispatch.product_shape(x, fmt)


def _run(pairs, out=None, accumulate=False, backend=None):
    """Dispatch each pair, call each implementation once for its pairs; outputs in input order."""
    if len(pairs) == 1:
        (x, w), = pairs
        fn = dispatch.implementation("linear", dispatch.choose("linear", _key(x, w), backend))
        return fn([(x if x.dim() == 2 else x.reshape(math.prod(x.shape[:-1]), x.shape[-1]), w)], out, accumulate)
    groups = {}
    for i, (x, w) in enumerate(pairs):
        rows = x.numel() // x.shape[-1]
        groups.setdefault((dispatch.choose("linear", _key(x, w), backend), rows), []).append(i)
    ys = [None] * len(pairs)
    for (name, rows), idx in groups.items():
        flat = [(pairs[i][0].reshape(rows, pairs[i][0].shape[-1]), pairs[i][1]) for i in idx]
        outs = None if out is None else [out[i] for i in idx]
        for i, y in zip(idx, dispatch.implementation("linear", name)(flat, outs, accumulate)):
            ys[i] = y
    return ys


def _shaped(y, x, weight):
    return y.reshape(*x.shape[:-1], weight.shape[0])


def linear(x, weight, backend=None):
    """x [..., in] @ weight[out, in]^T -> [..., out]."""
    return _shaped(_run([(x, weight)], backend=backend)[0], x, weight)


def linear_group(*pairs, backend=None):
    """Several independent products [(x, W), ...] -> tuple of outputs. Pairs that go to the same
    implementation with the same rows run as one call (the C kernel: one pool job)."""
    return tuple(_shaped(y, x, w) for y, (x, w) in zip(_run(pairs, backend=backend), pairs))


def linear_accumulate_(x, weight, out, backend=None):
    """out += x W^T, in place (the residual add fused into the decode product)."""
    if not out.is_contiguous():
        return out.add_(linear(x, weight, backend))
    _run([(x, weight)], out=[out.view(-1, weight.shape[0])], accumulate=True, backend=backend)
    return out
