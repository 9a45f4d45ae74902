"""The RWKV-4 model: weights in inference form and a functional forward.

    logits, state = model.forward(tokens [B, T], state)

T == 1 is token mode (one decode step per stream); T > 1 is sequence mode: on the CPU a short
sequence (at most `rwkv_kernels.dispatch.short_rows(format)` rows: 48 for float32, any number for int8
on the 512-bit build) is C calls with the bits of its tokens fed one by one, a longer one matrix-matrix
products and one WKV scan over time (a long prompt in chunks of SEQUENCE_CHUNK tokens);
`rwkv_kernels.sequence_layers` decides. Both modes update `state` in place and return it, so a prompt
can be fed in chunks with the state carried.
"""
from dataclasses import dataclass, fields

import torch

import rwkv_kernels

from . import files, generation, process
from . import weights as wformat
from .config import RWKVConfig
from .contract import DTYPES, as_dtype, as_token_batch  # noqa: F401  (DTYPES, as_dtype: old import path)
from .state import State, StateInUseError  # noqa: F401  (StateInUseError: what forward raises)


@dataclass
class Block:
    """One layer in inference form: time_* squeezed to [C], decay stored as w = -exp(time_decay)."""
    ln1_w: torch.Tensor
    ln1_b: torch.Tensor
    att_mix_k: torch.Tensor
    att_mix_v: torch.Tensor
    att_mix_r: torch.Tensor
    att_w: torch.Tensor      # float32 log-decay per step: -exp(time_decay)
    att_u: torch.Tensor      # float32 bonus for the current token: time_first
    att_key: torch.Tensor    # [C, C] (out, in)
    att_value: torch.Tensor
    att_receptance: torch.Tensor
    att_output: torch.Tensor
    ln2_w: torch.Tensor
    ln2_b: torch.Tensor
    ffn_mix_k: torch.Tensor
    ffn_mix_r: torch.Tensor
    ffn_key: torch.Tensor    # [F, C]
    ffn_value: torch.Tensor  # [C, F]
    ffn_receptance: torch.Tensor


# Memory a load leaves free when it copies memory-mapped matrices (copies_fit): at least this share of
# the machine's RAM, and at least COPY_RESERVE_MIN bytes.
COPY_RESERVE_SHARE = 0.10
COPY_RESERVE_MIN = 1 << 30


def copies_fit(nbytes, available=None, total=None):
    """Whether copying `nbytes` of memory-mapped matrices into the process leaves the reserve free:
    nbytes <= available - max(COPY_RESERVE_SHARE x total RAM, COPY_RESERVE_MIN). Copied matrices are
    anonymous memory, which the kernel cannot drop and re-read as it can a file's clean pages, so a model
    that does not fit keeps its mapping (it then runs as before, at the mapping's speed)."""
    if available is None or total is None:
        import psutil
        vm = psutil.virtual_memory()
        available, total = vm.available if available is None else available, vm.total if total is None else total
    return nbytes <= available - max(COPY_RESERVE_SHARE * total, COPY_RESERVE_MIN)


def _mapped_matrices(sd, cfg, layers, last, device, dtype):
    """The checkpoint's matrices that would be used as they are (already stored as `dtype`, on the CPU)
    and lie in a memory-mapped file: {key: tensor}."""
    if torch.device(device).type != "cpu" or dtype is None:
        return {}
    names = ("att.key.weight", "att.value.weight", "att.receptance.weight", "att.output.weight",
             "ffn.key.weight", "ffn.value.weight", "ffn.receptance.weight")
    keys = [f"blocks.{i}.{n}" for i in layers for n in names] + (["head.weight"] if last else [])
    maps = files.private_file_maps()
    out = {}
    for k in keys:
        t = sd[k]
        if (isinstance(t, torch.Tensor) and t.dtype == dtype and t.device.type == "cpu" and t.is_contiguous()
                and files.in_maps(t, maps)):
            out[k] = t
    return out


def to_inference_form(sd, cfg: RWKVConfig, device, dtype, rescale_every=0, layers=None, weights=None, progress=None,
                      copy_weights=None):
    """The one place raw checkpoint tensors become what the forward reads.

    Tensors already of the target dtype on the target device are used as they are, except the float
    matrices of a memory-mapped checkpoint on the CPU, which are copied into the process's memory one
    at a time, each one's file pages dropped as it is copied (`copy_weights`: True, False, None: when
    they fit, `copies_fit`). Read from the mapping, 1b5's float32 and bfloat16 decode steps took 1.25x
    and 1.235x the copies' time (Intel Xeon, family 6 model 167, 2 threads, the two loads alternating in
    one process; 169m 1.00-1.05x; docs/results.md). Others are converted once. With `weights` (a format
    of `rwkv_kernels.quant`),
    the matrices are packed into it one at a time and the embedding is kept in 16 bits
    (`rwkv_engine.weights`); `progress` wraps the layer loop (a tqdm). With `rescale_every` R > 0, the output
    matrices of layer i are divided by 2^(i // R) and the forward halves x after every R-th layer:
    the residual stream then stays inside float16's range (max 65504) on long inputs, and the
    final LayerNorm makes the logits independent of the scale.
    layers: a range of layers to build (a pipeline stage); the embedding comes only with layer 0 and
    ln_out/head only with the last layer, and only the keys of what is built are read from `sd`.
    """
    def cast(t, dt=dtype):
        return t.to(device=device, dtype=dt)

    def vec(t, dt=dtype):
        return cast(t.reshape(-1), dt)

    eps = cfg.layer_norm_eps
    layers = range(cfg.n_layer) if layers is None else layers
    first, last = layers.start == 0, layers.stop == cfg.n_layer
    # float matrices stored as they are: a float format's dtype (weights="bfloat16"), or the compute dtype
    stored = dtype if weights is None else wformat.float_format_dtype(weights)
    mapped = {} if copy_weights is False else _mapped_matrices(sd, cfg, layers, last, device, stored)
    if copy_weights is None and mapped and not copies_fit(sum(t.numel() * t.element_size() for t in mapped.values())):
        mapped = {}
    copy_at = {t.data_ptr() for t in mapped.values()}        # by address: a lazy state dict may give new views

    def mat(t, scale=1):
        if weights is not None:
            m = wformat.pack_matrix(t, weights, scale)
        else:
            m = cast(t.float() / scale) if scale != 1 else cast(t)
        if isinstance(m, torch.Tensor) and m.data_ptr() in copy_at and m.data_ptr() == t.data_ptr():
            drop = files.page_dropper(t)          # the mapping's pages, dropped once copied
            files.populate(t)
            m = m.clone()
            drop(t)
        return m

    emb = None
    if first:   # ln0 is applied to the embedding table once here instead of to x at every step.
        ln0_w, ln0_b = sd["blocks.0.ln0.weight"].reshape(-1).float(), sd["blocks.0.ln0.bias"].reshape(-1).float()
        # packed weights on the CPU: looked up from the memory-mapped table (no resident copy of it)
        emb = wformat.ln0_embedding(sd["emb.weight"], ln0_w, ln0_b, eps, weights or "float32",
                                    lazy=weights is not None)
        if weights is None:
            emb = cast(emb)
    blocks = []
    for i in (progress(layers) if progress else layers):
        g = lambda name: sd[f"blocks.{i}.{name}"]
        scale = 2 ** (i // rescale_every) if rescale_every else 1
        out = lambda name: mat(g(name), scale)
        blocks.append(Block(
            ln1_w=vec(g("ln1.weight")), ln1_b=vec(g("ln1.bias")),
            att_mix_k=vec(g("att.time_mix_k")), att_mix_v=vec(g("att.time_mix_v")),
            att_mix_r=vec(g("att.time_mix_r")),
            att_w=-torch.exp(vec(g("att.time_decay"), torch.float32)),
            att_u=vec(g("att.time_first"), torch.float32),
            att_key=mat(g("att.key.weight")), att_value=mat(g("att.value.weight")),
            att_receptance=mat(g("att.receptance.weight")), att_output=out("att.output.weight"),
            ln2_w=vec(g("ln2.weight")), ln2_b=vec(g("ln2.bias")),
            ffn_mix_k=vec(g("ffn.time_mix_k")), ffn_mix_r=vec(g("ffn.time_mix_r")),
            ffn_key=mat(g("ffn.key.weight")), ffn_value=out("ffn.value.weight"),
            ffn_receptance=mat(g("ffn.receptance.weight")),
        ))
        if weights is not None:
            process.trim_heap()
    if not last:
        return dict(emb=emb, blocks=blocks, ln_out_w=None, ln_out_b=None, head=None)
    head = mat(sd["head.weight"])
    if weights is not None:
        process.trim_heap()
    return dict(emb=emb, blocks=blocks, ln_out_w=vec(sd["ln_out.weight"]),
                ln_out_b=vec(sd["ln_out.bias"]), head=head)


# Sequence mode runs a prompt of more than SEQUENCE_CHUNK tokens per stream in chunks, the state
# carried from one to the next, so its working memory (the [B, T, ffn_dim] activations of a layer)
# is that of one chunk whatever the prompt's length. Chunks are near-equal (never a short tail), so
# every chunk's products stay on the rows of rwkv_kernels.dispatch a whole prompt takes (> 2048 rows, past
# every finite `short_rows`: the GEMM; the C step for a format without a limit, which is chunk-invariant):
# on the CPU (MKL) the logits are bit-identical to one call over the whole prompt, and prompts up
# to SEQUENCE_CHUNK tokens run exactly as before on every device.
SEQUENCE_CHUNK = 4096


def sequence_chunks(T, chunk=None):
    """[(start, stop), ...]: T positions in the fewest near-equal chunks of at most `chunk`."""
    n = -(-T // (chunk or SEQUENCE_CHUNK))
    bounds = [i * T // n for i in range(n + 1)]         # lengths differ by at most one
    return list(zip(bounds[:-1], bounds[1:]))


def check_layer_range(layers, n_layer):
    """None -> all layers; else a non-empty range(i0, i1) inside [0, n_layer)."""
    if layers is None:
        return range(n_layer)
    if not isinstance(layers, range) or layers.step != 1 or not 0 <= layers.start < layers.stop <= n_layer:
        raise ValueError(f"layers must be a non-empty range inside range(0, {n_layer}), got {layers!r}")
    return layers


@dataclass(frozen=True)
class LoadOptions:
    """How a model is built from its checkpoint: what `rwkv_engine.load`, `RWKV` and the pipeline's
    ranks are given (the checkpoint itself, its provenance and the tokenizer are not options).

    device: cpu or cuda. dtype: the compute dtype (float32, float16, bfloat16). weights: the weight
    format of the large matrices (a name of `rwkv_kernels.formats.names()`; None: as dtype, or a packed
    file's own). rescale_every: halve the residual every N layers (None: 6 for float16, else 0).
    layers: a range of layers to build (a pipeline stage; None: all). wkv_backend: None (chosen by
    device in rwkv_kernels.wkv) or a backend name. copy_weights: whether float matrices that would be
    read from the memory-mapped checkpoint as they are (CPU, the checkpoint's own dtype) are copied into
    the process's memory, matrix by matrix with each one's file pages dropped: True, False, or None
    (default: when they fit in the memory available, see `copies_fit`)."""
    device: "str | torch.device" = "cpu"
    dtype: "str | torch.dtype" = "float32"
    weights: "str | None" = None
    rescale_every: "int | None" = None
    layers: "range | None" = None
    wkv_backend: "str | None" = None
    copy_weights: "bool | None" = None

    def __post_init__(self):
        r = self.rescale_every
        if r is not None and (isinstance(r, bool) or not isinstance(r, int) or r < 0):
            raise ValueError(f"rescale_every must be an int >= 0 (0: off), got {r!r}")
        if self.copy_weights not in (None, True, False):
            raise ValueError(f"copy_weights must be True, False or None (when they fit), got {self.copy_weights!r}")

    @classmethod
    def of(cls, options=None, **keywords):
        """A LoadOptions from either an instance or its fields as keywords (not both)."""
        if options is None:
            return cls(**keywords)
        if not isinstance(options, cls):
            raise TypeError(f"options must be a rwkv_engine.LoadOptions, got {type(options).__name__}")
        if keywords:
            raise TypeError(f"give either options= or {', '.join(sorted(keywords))}, not both")
        return options

    @classmethod
    def names(cls):
        return tuple(f.name for f in fields(cls))


class RWKV:
    """An RWKV-4 model ready for inference. Build it with `rwkv_engine.load`.

    RWKV(cfg, sd, options) with a `LoadOptions`, or RWKV(cfg, sd, dtype="float16", ...) with its fields as
    keywords; source/synthetic say where the weights came from, progress wraps the layer loop (a tqdm)."""

    # What a server may ask of it (rwkv_engine.serve reads these, never the class):
    batched_token_mode = True   # one token-mode forward steps B streams, each row as it would alone
    batched_prefill = True      # sequence mode over stacked states, rows independent under dispatch.rows_independent()
    state_copy = True           # state.clone(), state.select(rows), State.cat(states)

    def __init__(self, cfg: RWKVConfig, sd, options: LoadOptions = None, *, tokenizer=None, source="",
                 synthetic=False, progress=None, **option_keywords):
        options = LoadOptions.of(options, **option_keywords)
        self.config = cfg
        self.device = torch.device(options.device)
        self.dtype = as_dtype(options.dtype)
        self.source = str(source)
        self.synthetic = synthetic
        self.tokenizer = tokenizer
        # float16 needs the residual rescaled (the official packages use 6 as well); others do not
        rescale_every = options.rescale_every
        if rescale_every is None:
            rescale_every = 6 if self.dtype == torch.float16 else 0
        self.rescale_every = rescale_every
        self.wkv_backend = options.wkv_backend          # None: chosen by device in rwkv_kernels.wkv
        self.layers = check_layer_range(options.layers, cfg.n_layer)   # a pipeline stage holds only some
        packed = wformat.pack_target(options.weights, self.dtype, self.device)
        if packed is not None and rescale_every:
            raise ValueError("rescale_every applies to float16 compute only, not to packed weights")
        w = to_inference_form(sd, cfg, self.device, self.dtype, rescale_every, self.layers, packed, progress,
                              options.copy_weights)
        self.weights = packed or next(k for k, v in rwkv_kernels.quant.FLOAT_FORMATS.items() if v == self.dtype)
        self.emb, self.blocks, self.head = w["emb"], w["blocks"], w["head"]
        self.ln_out_w, self.ln_out_b = w["ln_out_w"], w["ln_out_b"]
        self._decode = rwkv_kernels.DecodeLayers(self.blocks, cfg.n_embd, cfg.layer_norm_eps, rescale_every,
                                            self.layers.start)
        self._token_step = rwkv_kernels.DecodeModel(self._decode, self)

    # -- facts the benchmark and the generation loop read -----------------------------------
    @property
    def vocab_size(self):
        return self.config.vocab_size

    @property
    def n_params(self):
        return self.config.n_params

    @property
    def weight_format(self):
        """The format of the large matrices (a name of `rwkv_kernels.formats`); `weights` is the same."""
        return self.weights

    @property
    def weight_bytes_per_token(self):
        return int(self.config.weight_bytes_per_token(rwkv_kernels.formats.get(self.weights).bytes_per_weight))

    def state_bytes(self, batch_size=1):
        return State.zeros(len(self.layers), batch_size, self.config.n_embd, "meta", self.dtype).nbytes

    def new_state(self, batch_size=1, max_len=None):
        """A fresh state for `batch_size` streams (`max_len` is accepted and unused: no cache grows)."""
        return State.zeros(len(self.layers), batch_size, self.config.n_embd, self.device, self.dtype)

    def __repr__(self):
        c = self.config
        src = "synthetic weights" if self.synthetic else self.source
        part = "" if len(self.layers) == c.n_layer else f" (holds {self.layers.start}..{self.layers.stop - 1})"
        fmt = f" {self.weights} weights," if self.weights != str(self.dtype).removeprefix("torch.") else ""
        return (f"RWKV({c.name or 'rwkv-4'}: {c.n_layer} layers{part}, n_embd {c.n_embd}, {self.dtype},{fmt} "
                f"{self.device}, {src})")

    # -- forward ------------------------------------------------------------------------------
    @torch.inference_mode()
    def forward(self, tokens, state=None, all_logits=False):
        """tokens: LongTensor [B, T] (or [T] / list for one stream).
        Returns logits float32 [B, V] for the last position ([B, T, V] with all_logits) and the
        state, which is updated in place (clone it first to keep the old one).

        One forward per state at a time: a state that a forward in another thread is updating is
        refused with StateInUseError (both would otherwise return wrong logits); give each thread
        its own state. A prompt of more than SEQUENCE_CHUNK tokens runs in chunks with the state
        carried, so memory besides the returned logits does not grow with its length."""
        if len(self.layers) != self.config.n_layer:
            raise ValueError(f"this model holds layers {self.layers.start}..{self.layers.stop - 1} only "
                             "(a pipeline stage): run it through rwkv_engine.pipeline")
        tokens = self._token_batch(tokens)
        B, T = tokens.shape
        if state is None:
            state = self.new_state(B)
        elif not isinstance(state, State):
            raise ValueError(f"state must be a rwkv_engine.State, got {type(state).__name__}")
        else:
            state.check(self.config.n_layer, B, self.config.n_embd, self.device, self.dtype)
        state.claim()
        try:
            if T == 1:          # one token per stream: one call on the CPU path (embedding to logits)
                logits = rwkv_kernels.decode_token(self._token_step, tokens, (state.att_x, state.att_a, state.att_b,
                                                   state.att_p, state.ffn_x), self.wkv_backend)
                return (logits[:, None] if all_logits else logits), state
            if T <= SEQUENCE_CHUNK:
                return self.head_logits(self.run_blocks(self.embed(tokens), state), all_logits), state
            return self._forward_chunked(tokens, state, all_logits), state
        finally:
            state.release()

    def _forward_chunked(self, tokens, state, all_logits):
        """A long prompt chunk by chunk (see SEQUENCE_CHUNK); [B, T, V] is filled as the chunks run."""
        B, T = tokens.shape
        out = torch.empty(B, T, self.vocab_size, device=self.device) if all_logits else None
        for start, stop in sequence_chunks(T):
            x = self.run_blocks(self.embed(tokens[:, start:stop]), state)
            if all_logits:
                out[:, start:stop] = self.head_logits(x, all_logits=True)
        return out if all_logits else self.head_logits(x)

    # The forward in three pieces; a pipeline stage (rwkv_engine.pipeline) runs those it holds.
    def embed(self, tokens):
        """tokens [B, T] -> x: (B, C) in token mode (T == 1), which the blocks update in place,
        else (B, T, C)."""
        # a copy: safe to update; widened where the table is 16-bit (with packed weights)
        return rwkv_kernels.decode.embed_rows(self.emb, tokens[:, 0] if tokens.shape[1] == 1 else tokens, self.dtype)

    def run_blocks(self, x, state):
        """Run the layers this model holds on x; `state` holds those layers only (in order).
        Token mode is one `rwkv_kernels.decode_layers` step (one C call on the CPU); sequence mode is
        `rwkv_kernels.sequence_layers`."""
        tensors = (state.att_x, state.att_a, state.att_b, state.att_p, state.ffn_x)
        if x.dim() == 2:
            return rwkv_kernels.decode_layers(self._decode, x, tensors, self.wkv_backend)
        return rwkv_kernels.sequence_layers(self._decode, x, tensors, self.wkv_backend)

    def head_logits(self, x, all_logits=False):
        """x from the last layer -> float32 logits [B, V] of the last position ([B, T, V] with all_logits)."""
        if x.dim() == 2:
            x = x[:, None]
        if not all_logits:
            x = x[:, -1:]
        x = rwkv_kernels.decode.layer_norm(x, self.ln_out_w, self.ln_out_b, self.config.layer_norm_eps)
        logits = rwkv_kernels.linear(x, self.head).float()                 # (B, T or 1, V)
        return logits if all_logits else logits[:, 0]

    __call__ = forward

    def _token_batch(self, tokens):
        """check_tokens, with a cheap path for the decode loop's own input (an int64 [B, 1] tensor on the
        model's device), whose ids the token step checks (a ValueError, before any change)."""
        if (type(tokens) is torch.Tensor and tokens.dtype is torch.int64 and tokens.dim() == 2 and tokens.shape[1] == 1
                and tokens.shape[0] > 0 and tokens.device == self.device):
            return tokens
        return self.check_tokens(tokens)

    def check_tokens(self, tokens):
        """tokens (ids, a list of lists, or an integer tensor) -> a validated [B, T] int64 batch on the
        model's device; ValueError in one line for ids outside the vocabulary, bad shapes or dtypes."""
        return as_token_batch(tokens, self.vocab_size, self.device)

    # -- generation (the loop shared with the baselines) --------------------------------------
    def generate(self, prompt, max_new_tokens=64, **kwargs):
        return generation.generate(self, prompt, max_new_tokens, **kwargs)

    def stream(self, prompt, max_new_tokens=64, **kwargs):
        return generation.stream(self, prompt, max_new_tokens, **kwargs)
