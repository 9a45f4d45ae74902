"""Ops of the RWKV-4 model, each with a plain reference of the same signature beside it.

Which implementation runs is decided by one table, `kernels.dispatch.TABLE` (op x device x compute
dtype x weight format x shape class; `python -m kernels` prints it). Token mode and
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

OpenMP spinning: torch's OpenMP (GNU libgomp) threads spin for ~300000 rounds (~10-20 ms here) after
each parallel region before they sleep, and a spinning thread holds a core that the library's own
pool (which runs the decode and short-prompt products) then waits for. Imported before torch, this
package sets GOMP_SPINCOUNT=10000 (about half a millisecond: threads stay hot between the ops of
one forward) unless the environment already sets GOMP_SPINCOUNT or OMP_WAIT_POLICY; libgomp reads it
once, when torch loads, so a program that imports torch first keeps the default unless it sets the
variable itself. Measured (169m, 2 threads, a 14-token prompt chunk): 78 ms per forward with the
default spin, 52 ms with 10000.
"""
import os as _os
import sys as _sys

SPIN_DEFAULT = "10000"
SPIN_SET_HERE = "torch" not in _sys.modules and not ({"GOMP_SPINCOUNT", "OMP_WAIT_POLICY"} & set(_os.environ))
if SPIN_SET_HERE:           # child processes inherit it; bench.contention's competitors get it removed
    _os.environ["GOMP_SPINCOUNT"] = SPIN_DEFAULT

from . import dispatch, formats, quant
from .decode import DecodeLayers, decode_layers
from .fused import add_gated_, ln_shift_mix, relu_square_, wkv_step_gated
from .linear import linear, linear_accumulate_, linear_group, linear_reference
from .sampling import sample_rows, sample_rows_reference, sample_rows_serves
from .wkv_cpu import wkv_cpu, wkv_cpu_step, wkv_numpy
from .wkv_ops import wkv, wkv_step
from .wkv_reference import P_INIT, new_wkv_state, wkv_reference
