"""y = x W^T for the model's matrices, on the fastest path for the device and shape.

CPU float32, the rule:
  * a few rows (decode: B x 1 tokens, up to DECODE_ROWS): the C kernel in `cpu_c`, which streams
    the weights once with AVX2 on torch's own OpenMP threads. torch's matrix-vector path (MKL)
    reaches ~10 GB/s on this project's reference CPU (AMD Zen 3), the C kernel ~15-20.
  * more rows (a prompt): torch's GEMM. numpy's OpenBLAS is faster in isolation, but its thread
    pool then competes with torch's for the two cores between ops and the prompt gets slower.
Everything else (CUDA, 16-bit weights) goes to torch. All paths share the tensors' memory.
"""
import torch
import torch.nn.functional as F

from . import cpu_c, quant

DECODE_ROWS = 8
PACKED_MATVEC_ROWS = 64         # compressed weights: the batch-invariant C kernel up to this many rows


def linear_reference(x, weight):
    """x [..., in], weight [out, in] -> [..., out]."""
    return F.linear(x, weight)


def _is_cpu_f32(x, weight):
    return x.device.type == "cpu" and x.dtype == torch.float32 and weight.dtype == torch.float32


def _decode_kernel_fits(x, weight):
    return x.numel() // x.shape[-1] <= DECODE_ROWS and weight.is_contiguous() and cpu_c.available()


def _is_packed(x, weight):
    """float32 activations with 16-bit or int8 weights (kernels.quant)."""
    return x.dtype == torch.float32 and (not isinstance(weight, torch.Tensor) or weight.dtype != torch.float32)


def _packed(pairs, out=None, accumulate=False):
    rows = pairs[0][0].numel() // pairs[0][0].shape[-1]
    flat = [(x.reshape(-1, x.shape[-1]).float().contiguous(), w) for x, w in pairs]
    impl = quant.linear_matvec if rows <= PACKED_MATVEC_ROWS and x_on_cpu(pairs) else \
        quant.linear_gemm if x_on_cpu(pairs) else quant.linear_torch
    ys = impl(flat, out, accumulate)
    return [y.reshape(*x.shape[:-1], w.shape[0]) for y, (x, w) in zip(ys, pairs)]


def x_on_cpu(pairs):
    return all(x.device.type == "cpu" for x, _ in pairs)


def linear(x, weight):
    """The dispatch rule for one product (see the module docstring)."""
    if _is_packed(x, weight):
        return _packed([(x, weight)])[0]
    if not _is_cpu_f32(x, weight):
        return F.linear(x, weight)
    if _decode_kernel_fits(x, weight):
        x2 = x.reshape(-1, x.shape[-1]).contiguous()
        return cpu_c.matvec_group([(x2, weight)])[0].reshape(*x.shape[:-1], weight.shape[0])
    return F.linear(x, weight)


def linear_group(*pairs):
    """Several independent products [(x, W), ...] -> tuple of outputs. On the CPU decode path they
    run in one parallel region (threads woken once per group instead of once per matrix)."""
    if all(_is_packed(x, w) for x, w in pairs) and len({x.numel() // x.shape[-1] for x, _ in pairs}) == 1:
        return tuple(_packed(list(pairs)))
    if all(_is_cpu_f32(x, w) and _decode_kernel_fits(x, w) for x, w in pairs) and \
            len({x.numel() // x.shape[-1] for x, _ in pairs}) == 1:
        flat = [(x.reshape(-1, x.shape[-1]).contiguous(), w) for x, w in pairs]
        outs = cpu_c.matvec_group(flat)
        return tuple(y.reshape(*x.shape[:-1], w.shape[0]) for y, (x, w) in zip(outs, pairs))
    return tuple(linear(x, w) for x, w in pairs)


def linear_accumulate_(x, weight, out):
    """out += x W^T, in place (the residual add fused into the decode product)."""
    if _is_packed(x, weight) and out.is_contiguous() and x.dim() == 2:
        _packed([(x, weight)], out=[out], accumulate=True)
        return out
    if _is_cpu_f32(x, weight) and _decode_kernel_fits(x, weight) and out.is_contiguous() and x.dim() == 2:
        cpu_c.matvec_group([(x.contiguous(), weight)], out=[out], accumulate=True)
        return out
    return out.add_(linear(x, weight))
