"""Temperature sampling of rows of logits by inverting the CDF, beside its reference.

    sample_rows(logits [B, V] float32, inv_temp, u [B] float64 in (0, 1]) -> int64 [B]

Definition (the reference, in float64): w_i = exp((x_i - max x) * inv_temp); the token is the first i
with w_0 + ... + w_i >= u * sum(w). A row holding NaN or an infinity gets -1 - (its first such index)
instead of a token, so the caller can name it. `rwkv_engine.sampling` draws u from each stream's own
generator and calls this for plain temperature sampling (no top-k/top-p/penalties).

Implementations: "c" (`csrc/sample.h`: two passes over the row with the vector exp, block sums in
double; each row alone, rows in parallel) for float32 contiguous CPU logits, else "reference". The C
weights are float32 (exp within 2 ulp), so its token can differ from the reference's only when u * sum
falls within ~1e-6 (relative) of a boundary of the CDF.
"""
import torch

from . import cpu_c, dispatch


def sample_rows_reference(logits, inv_temp, u):
    x = logits.to(torch.float64)
    bad = ~torch.isfinite(x)
    w = torch.exp((x - x.max(dim=-1, keepdim=True).values) * float(inv_temp))
    cdf = torch.cumsum(w, dim=-1)
    target = (u.to(torch.float64) * cdf[:, -1]).unsqueeze(-1)
    tokens = torch.searchsorted(cdf, target).squeeze(-1).clamp_(max=x.shape[-1] - 1)
    rows = bad.any(dim=-1)
    if bool(rows.any()):
        first = bad.to(torch.int64).argmax(dim=-1)
        tokens = torch.where(rows, -1 - first, tokens)
    return tokens


def sample_rows_c(logits, inv_temp, u):
    return cpu_c.ops().sample_rows(logits, inv_temp, u.to(torch.float64).contiguous())


dispatch.register_impl("sample_rows", "c", sample_rows_c, needs_c=True)
dispatch.register_impl("sample_rows", "reference", sample_rows_reference)


def sample_rows(logits, inv_temp, u, backend=None):
    """Tokens [B] (int64) for logits [B, V], 1 / temperature and u [B] in (0, 1]; see the module."""
    key = (dispatch.device_of(logits), dispatch.compute_of(logits), "-", dispatch.layout_of(logits))
    return dispatch.pick("sample_rows", key, backend)[1](logits, inv_temp, u)


def sample_rows_serves(logits):
    """Whether `sample_rows` has a kernel of its own for logits like these (2-D, taken contiguous): the
    dispatch table's answer, which callers ask rather than repeat its rule (`rwkv_engine.sampling`
    sends plain temperature sampling there only then, the server batches those rows)."""
    if logits.dim() != 2:
        return False
    try:
        device = dispatch.device_of(logits)
    except ValueError:
        return False
    return dispatch.has_kernel("sample_rows", (device, dispatch.dtype_name(logits.dtype), "-", "contiguous"))
