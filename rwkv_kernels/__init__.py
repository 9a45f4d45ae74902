"""Ops of the RWKV-4 model, each with a plain reference of the same signature beside it.

Which implementation runs is decided by one table, `rwkv_kernels.dispatch.TABLE` (op x device x compute
dtype x weight format x shape class; `python -m rwkv_kernels` prints it). Token mode and
sequence mode both go through it; each op takes `backend=` to pick one explicitly, and
`dispatch.force(op=impl)` forces one in a block.
  * `wkv`, `wkv_step` (wkv_ops.py): WKV over a sequence / one token.
  * `linear`, `linear_group`, `linear_accumulate_` (linear.py): the products.
  * `ln_shift_mix`, `wkv_step_gated`, `relu_square_`, `add_gated_` (fused.py): the element-wise
    work of a decode step.
  * `decode_layers` (decode.py): a whole decode step through a run of layers (one C call on the
    CPU, or the ops above composed).
  * `sample_rows` (sampling.py): temperature sampling of rows of logits by inverting the CDF.
The C CPU kernels, their builder and their one binding are in `cpu_c.py` / `csrc/`; the weight formats
are records in `formats.py` (one per format: everything else derives from them), their kernels in
`quant.py`.

Import-time state: `import rwkv_kernels` does one thing at import, in `rwkv_kernels.spin`: it shortens the
spin of torch's OpenMP threads (GOMP_SPINCOUNT, read by libgomp when torch loads; never over a
user's value), and says once, at the first use of the C kernels, when torch was imported first and it
could not. Everything else (the C build and its instruction set, thread counts) is read at first use.
"""
from . import spin

spin.set_default()
SPIN_DEFAULT = spin.DEFAULT
SPIN_SET_HERE = spin.set_here       # bench.contention's competitors get it removed

from . import dispatch, formats, quant
from . import lowbit  # noqa: F401  (registers the low-bit formats)
from .decode import DecodeLayers, DecodeModel, decode_layers, decode_token, sequence_layers
from .fused import add_gated_, ln_shift_mix, relu_square_, wkv_step_gated
from .linear import linear, linear_accumulate_, linear_group, linear_reference
from .sampling import sample_rows, sample_rows_reference, sample_rows_serves
from .wkv_cpu import wkv_cpu, wkv_cpu_step, wkv_numpy
from .wkv_ops import wkv, wkv_step
from .wkv_reference import P_INIT, new_wkv_state, wkv_reference
