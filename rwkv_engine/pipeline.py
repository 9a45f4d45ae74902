"""Pipeline-parallel RWKV-4 over torch.distributed: the layers split among ranks (processes, hosts
or GPUs), each rank holding only its slice of the weights and of every state.

    # run.py, the same on every rank:  torchrun --standalone --nproc-per-node 2 run.py
    from rwkv_engine import pipeline
    model = pipeline.load("rwkv-4-pile-169m")      # ranks > 0 serve here until rank 0 closes
    print(model.generate("The dragons", max_new_tokens=32, temperature=0).text[0])

On rank 0 the model has the single-process API (`forward`, `new_state`, `generate`, `stream`);
the other ranks run `Worker.run`. Rank 0 also holds the embedding, the last rank ln_out and the
head. A forward flows as items: the batch split into micro-batches (rows) and, in sequence mode,
the prompt into chunks (columns); a stage works on the next item while the following stage works
on the previous one. Only the hidden x of the items in flight crosses a boundary (`stage.py`),
plus the logits from the last rank back to rank 0.
"""
import atexit
import datetime
import hashlib
import json
import os
import signal
import sys
import threading
import time
import weakref
from dataclasses import dataclass, fields, replace

import torch
import torch.distributed as dist

from . import load as load_model, resolve
from .checkpoint import open_checkpoint, write_synthetic
from .generation import Sampler, generate, stream
from .contract import as_dtype
from .model import LoadOptions
from .process import usable_cores
from .sampling import SamplingParams
from .stage import TAG_LOGITS, TAG_X, Boundary, Header, PipelineError, hostname, init, process_token
from .state import State

OP_FORWARD, OP_NEW_STATE, OP_FREE_STATE, OP_CLONE_STATE, OP_SELECT_STATE, OP_CAT_STATES, OP_PING, OP_SHUTDOWN = range(1, 9)

__all__ = ["load", "split_layers", "decode_interleaved", "PipelinedRWKV", "PipelineState", "PipelineError", "Worker",
           "Stopped", "stop_on_signals", "PipelineOptions"]
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


# ---------------------------------------------------------------------------------------------
# Stopping: torchrun forwards SIGTERM/SIGINT to every rank (and Ctrl-C reaches the whole process
# group), so a worker outlives them: rank 0 decides, shuts the pipeline down, and the workers exit 0
# when it says so (or, with rank 0 gone, when the timeout says so).

class Stopped(Exception):
    """Rank 0 got SIGTERM or SIGINT inside `stop_on_signals`: raised at the start of the next
    pipeline operation, so no forward is left half done and close() shuts the workers down."""


_stop_signal = None             # the signal stop_on_signals() caught, if any


def _note_signal(signum, frame):
    global _stop_signal
    _stop_signal = signum


def stop_on_signals():
    """On rank 0 (call it in the main thread, before or after `load`): from now on SIGTERM and SIGINT
    make the next operation of the pipeline raise `Stopped`; the caller closes the pipeline and
    exits 0. (`python -m rwkv_engine.serve --pipeline` drains its requests itself instead.)"""
    for sig in STOP_SIGNALS:
        signal.signal(sig, _note_signal)


def _outlive_stop_signals():
    """A worker: SIGTERM/SIGINT do nothing (see above); only in the main thread, where handlers go."""
    if threading.current_thread() is threading.main_thread():
        for sig in STOP_SIGNALS:
            signal.signal(sig, lambda signum, frame: None)


# ---------------------------------------------------------------------------------------------
# The layer split and the work items

def split_layers(n_layer, world, layers_per_rank=None):
    """Layers of each rank as ranges. Even by default; the first ranks take the remainder (the
    last rank also runs the head, rank 0 only an embedding lookup)."""
    if world > n_layer:
        raise PipelineError(f"world size {world} is larger than the model's {n_layer} layers: "
                            "every rank needs at least one layer")
    if layers_per_rank is None:
        base, extra = divmod(n_layer, world)
        counts = [base + (r < extra) for r in range(world)]
    else:
        counts = list(layers_per_rank)
        if len(counts) != world:
            raise PipelineError(f"--layers-per-rank has {len(counts)} entries {counts} but the world has {world} ranks")
        if any(c < 1 for c in counts):
            raise PipelineError(f"--layers-per-rank {counts}: every rank needs at least one layer")
        if sum(counts) != n_layer:
            raise PipelineError(f"--layers-per-rank {counts} sums to {sum(counts)} but the model has {n_layer} layers")
    starts = [sum(counts[:r]) for r in range(world)]
    return [range(s, s + c) for s, c in zip(starts, counts)]


def parse_layers_per_rank(text):
    """'10,10,12' -> [10, 10, 12] (one-line ValueError otherwise)."""
    try:
        return [int(v) for v in text.split(",")]
    except ValueError:
        raise ValueError(f"--layers-per-rank must be comma-separated integers, got {text!r}") from None


@dataclass(frozen=True)
class Item:
    """One unit that flows through the stages: streams rows[0]:rows[1], positions cols[0]:cols[1]."""
    rows: tuple
    cols: tuple
    logits: bool         # whether the last rank computes and returns logits for it


def plan(B, T, micro_batches, chunk, all_logits):
    """The items of one forward, in the order every stage processes them (chunk-major, so each
    micro-batch's chunks stay in order and its state is carried)."""
    m = max(1, min(micro_batches, B))
    bounds = [B * i // m for i in range(m + 1)]
    rows = [(bounds[i], bounds[i + 1]) for i in range(m)]
    step = T if T == 1 or not chunk else chunk
    cols = [(c, min(c + step, T)) for c in range(0, T, step)]
    return [Item(r, c, all_logits or c[1] == T) for c in cols for r in rows]


def rows_of(state, r0, r1):
    """A view of streams r0:r1 of a state: the blocks update it, and so the whole state, in place."""
    return State(**{k: v[:, r0:r1] for k, v in state.tensors().items()})


# ---------------------------------------------------------------------------------------------
# One stage: the model slice this rank holds, and its part of each forward

class Stage:
    def __init__(self, model, boundary: Boundary):
        self.model, self.boundary = model, boundary

    def x_shape(self, item):
        """x is (b, C) for one position (token mode, as RWKV.embed gives), else (b, t, C)."""
        b, t = item.rows[1] - item.rows[0], item.cols[1] - item.cols[0]
        return (b, self.model.config.n_embd) if t == 1 else (b, t, self.model.config.n_embd)

    def logits_shape(self, item, all_logits):
        b, t = item.rows[1] - item.rows[0], item.cols[1] - item.cols[0]
        return (b, t, self.model.vocab_size) if all_logits else (b, self.model.vocab_size)

    @torch.inference_mode()
    def forward_items(self, items, state, all_logits, tokens=None):
        """This rank's part of one forward. Each item's x comes from the embedding (rank 0) or the
        previous rank, runs through this rank's layers, and goes to the next rank or (last rank)
        through the head. Returns the pending sends and, on a one-rank pipeline, the logits."""
        b = self.boundary
        dtype = self.model.dtype
        incoming = [] if b.prev is None else [b.post_recv(self.x_shape(it), dtype, b.prev, TAG_X) for it in items]
        sends, logits = [], []
        for k, it in enumerate(items):
            if b.prev is None:
                x = self.model.embed(tokens[it.rows[0]:it.rows[1], it.cols[0]:it.cols[1]])
            else:
                x = b.wait(incoming[k])
            x = self.model.run_blocks(x, rows_of(state, *it.rows))
            if b.next is not None:
                sends.append(b.send(x, b.next, TAG_X))
            elif it.logits:
                out = self.model.head_logits(x, all_logits)
                if b.rank == 0:
                    logits.append(out)
                else:
                    sends.append(b.send(out, 0, TAG_LOGITS))
        return sends, logits


class Worker:
    """Ranks > 0: hold a slice of the layers and of every state; do what rank 0's headers say."""

    def __init__(self, stage: Stage, timeout):
        self.stage, self.boundary = stage, stage.boundary
        self.timeout = timeout          # the boundary keeps the start-up timeout until the warm-up is done
        self.states = {}

    def run(self):
        """Serve until rank 0 sends shutdown. A failure raises PipelineError (naming the rank)."""
        b = self.boundary
        while True:
            h, payload = b.recv_header()
            try:
                if h.op == OP_SHUTDOWN:
                    return
                if h.op == OP_NEW_STATE:
                    self.states[h.new_state] = self.stage.model.new_state(h.batch)
                elif h.op == OP_FREE_STATE:
                    self.states.pop(h.state, None)
                elif h.op == OP_CLONE_STATE:
                    self.states[h.new_state] = self.states[h.state].clone()
                elif h.op == OP_SELECT_STATE:
                    self.states[h.new_state] = self.states[h.state].select(payload)
                elif h.op == OP_CAT_STATES:
                    self.states[h.new_state] = State.cat([self.states[i] for i in payload])
                elif h.op == OP_FORWARD:
                    items = plan(h.batch, h.length, h.micro_batches, h.prompt_chunk, bool(h.all_logits))
                    sends, _ = self.stage.forward_items(items, self.states[h.state], bool(h.all_logits))
                    b.wait_all(sends)
                    b.timeout = self.timeout          # after the first (warm-up) forward
            except PipelineError:
                raise
            except Exception as e:          # this rank's own failure (out of memory, a bug): say so
                b.fail(b.rank, "error", f"{type(e).__name__}: {e}")


# ---------------------------------------------------------------------------------------------
# Rank 0: the model object user code sees

class PipelineState:
    """A state whose layers live on their ranks: `local` is rank 0's slice; the other ranks hold
    theirs under `id`. Freed on every rank once no reference is left."""

    def __init__(self, model, sid, batch_size, local):
        self.id, self.batch_size, self.local, self._model = sid, batch_size, local, model
        weakref.finalize(self, model._freed.append, sid)

    def clone(self):
        """An independent copy (fork a conversation), on every rank."""
        return self._model._derive(OP_CLONE_STATE, self.batch_size, self.local.clone(), self.id)

    def select(self, streams):
        """A new state holding the given streams, in that order (as State.select)."""
        local = self.local.select(streams)                        # checks the indices
        idx = [streams] if isinstance(streams, int) else [int(i) % self.batch_size for i in streams]
        return self._model._derive(OP_SELECT_STATE, len(idx), local, self.id, payload=idx)

    @staticmethod
    def cat(states):
        """Stack the streams of several states of one pipeline into one batch (as State.cat)."""
        model = states[0]._model
        if any(not isinstance(s, PipelineState) or s._model is not model for s in states):
            raise ValueError("PipelineState.cat needs states of one pipeline")
        local = State.cat([s.local for s in states])
        return model._derive(OP_CAT_STATES, local.batch_size, local, payload=[s.id for s in states])

    @property
    def nbytes(self):
        """Bytes of this state on all ranks together."""
        return self._model.state_bytes(self.batch_size)


@dataclass
class Pending:
    """A forward in flight (PipelinedRWKV.submit)."""
    model: "PipelinedRWKV"
    incoming: list
    sends: list
    local: list
    n_chunks: int
    all_logits: bool

    def result(self):
        """Wait for the logits (bounded by the pipeline's timeout)."""
        return self.model._guarded(self.model._finish, self)


class PipelinedRWKV:
    """Rank 0's handle on the pipeline: the same API as `RWKV` (forward, new_state, generate,
    stream). micro_batches: streams are split into this many groups that flow one after another
    (default: the number of stages). prompt_chunk: sequence-mode inputs flow in chunks of this many
    tokens (default: whole; the logits then equal one process fed the same chunks)."""

    # What a server may ask of it (as RWKV's): the ranks split a batch into micro-batches of their
    # own, so several prompts are not prefilled in one forward
    batched_token_mode = True
    batched_prefill = False
    state_copy = True

    def __init__(self, stage: Stage, split, micro_batches=None, prompt_chunk=None):
        self.stage, self.boundary, self.split = stage, stage.boundary, split
        m = stage.model
        self.config, self.device, self.dtype, self.tokenizer = m.config, m.device, m.dtype, m.tokenizer
        self.synthetic, self.source, self.rescale_every = m.synthetic, m.source, m.rescale_every
        self.weight_format = m.weight_format        # the file's format (every rank reads the same file)
        self.micro_batches = micro_batches or len(split)
        self.prompt_chunk = prompt_chunk
        self._lock = threading.Lock()
        self._freed, self._next_id, self._closed, self._broken = [], 1, False, None
        self._in_flight = []            # submitted forwards whose result() is still to come
        self._last_sent = time.monotonic()
        self._keepalive = threading.Thread(target=self._keep_workers_alive, daemon=True)
        if len(split) > 1:
            self._keepalive.start()

    vocab_size = property(lambda self: self.config.vocab_size)
    n_params = property(lambda self: self.config.n_params)
    weight_bytes_per_token = property(lambda self: self.stage.model.weight_bytes_per_token)   # the whole model's

    def __repr__(self):
        c = self.config
        parts = ", ".join(f"{r.start}..{r.stop - 1}" for r in self.split)
        return f"PipelinedRWKV({c.name or 'rwkv-4'}: {c.n_layer} layers over {len(self.split)} ranks [{parts}], {self.dtype})"

    def state_bytes(self, batch_size=1):
        return State.zeros(self.config.n_layer, batch_size, self.config.n_embd, "meta", self.dtype).nbytes

    # -- operations (each one holds the lock: the keep-alive thread sends between them) ----------
    def _op(self, header: Header, payload=()):
        if _stop_signal is not None and not self._broken:
            raise Stopped(f"stopped by {signal.Signals(_stop_signal).name}")
        if self._closed:
            raise PipelineError("the pipeline is closed")
        if self._broken:
            raise PipelineError(f"the pipeline stopped earlier: {self._broken}")
        while self._freed:
            self._send(Header(OP_FREE_STATE, state=self._freed.pop()))
        self._send(header, payload=payload)

    def _send(self, header: Header, payload=()):
        if len(self.split) > 1:
            self.boundary.send_header(header, payload=payload)
        self._last_sent = time.monotonic()

    def _guarded(self, fn, *args):
        with self._lock:
            try:
                return fn(*args)
            except Stopped:                # raised before anything was sent: the pipeline is intact
                raise
            except PipelineError as e:
                self._broken = self._broken or str(e)
                raise
            except BaseException as e:     # rank 0 failed mid-operation: the workers learn why
                self._broken = f"rank 0 failed: {type(e).__name__}: {e}"
                try:
                    self.boundary.store.set("fault/0", f"error|0|{self._broken}")
                except Exception:
                    pass
                raise

    def new_state(self, batch_size=1, max_len=None):
        """A fresh state for `batch_size` streams, each rank allocating its layers' part."""
        local = self.stage.model.new_state(batch_size)          # checks batch_size

        def op():
            sid, self._next_id = self._next_id, self._next_id + 1
            self._op(Header(OP_NEW_STATE, new_state=sid, batch=batch_size))
            return PipelineState(self, sid, batch_size, local)
        return self._guarded(op)

    def _derive(self, op_code, batch_size, local, src=None, payload=()):
        """A new state made on every rank from existing ones (clone, select, cat); rank 0's part is
        `local`; clone and select read the state `src`, cat the states in `payload`."""
        def op():
            sid, self._next_id = self._next_id, self._next_id + 1
            self._op(Header(op_code, state=0 if src is None else src, new_state=sid), payload=payload)
            return PipelineState(self, sid, batch_size, local)
        return self._guarded(op)

    def forward(self, tokens, state=None, all_logits=False):
        """Same contract as RWKV.forward: tokens [B, T] -> (logits float32 [B, V] ([B, T, V] with
        all_logits), state updated in place)."""
        if state is None:
            state = self.new_state(self.stage.model.check_tokens(tokens).shape[0])
        return self.submit(tokens, state, all_logits).result(), state

    @torch.inference_mode()
    def submit(self, tokens, state, all_logits=False, micro_batches=None):
        """Start a forward and return at once (after rank 0's own layers) with a `Pending` whose
        result() gives the logits. Several submits on different states may be in flight: the
        stages then work on them at the same time (`decode_interleaved`)."""
        tokens = self.stage.model.check_tokens(tokens)
        B, T = tokens.shape
        if not isinstance(state, PipelineState) or state._model is not self:
            raise ValueError(f"state must come from this pipeline's new_state(), got {type(state).__name__}")
        if state.batch_size != B:
            raise ValueError(f"state holds {state.batch_size} streams but tokens have {B}")
        return self._guarded(self._submit, tokens, state, bool(all_logits), micro_batches or self.micro_batches)

    def _submit(self, tokens, state, all_logits, micro_batches):
        B, T = tokens.shape
        items = plan(B, T, micro_batches, self.prompt_chunk, all_logits)
        self._op(Header(OP_FORWARD, state=state.id, batch=B, length=T, all_logits=int(all_logits),
                        micro_batches=micro_batches, prompt_chunk=self.prompt_chunk or 0))
        b, stage = self.boundary, self.stage
        incoming = [] if b.world == 1 else [b.post_recv(stage.logits_shape(it, all_logits), torch.float32,
                                                         b.last, TAG_LOGITS) for it in items if it.logits]
        sends, logits = stage.forward_items(items, state.local, all_logits, tokens)
        pending = Pending(self, incoming, sends, logits, len({it.cols for it in items}), all_logits)
        self._in_flight.append(pending)
        return pending

    def _finish(self, pending):
        self._in_flight = [p for p in self._in_flight if p is not pending]
        b = self.boundary
        logits = pending.local + [b.wait(p) for p in pending.incoming]
        b.wait_all(pending.sends)
        if not pending.all_logits:
            return torch.cat(logits, dim=0)                              # micro-batches in order
        m = len(logits) // pending.n_chunks
        per_mb = [torch.cat(logits[i::m], dim=1) for i in range(m)]      # chunks in order
        return torch.cat(per_mb, dim=0)

    __call__ = forward

    def generate(self, prompt, max_new_tokens=64, **kwargs):
        return generate(self, prompt, max_new_tokens, **kwargs)

    def stream(self, prompt, max_new_tokens=64, **kwargs):
        return stream(self, prompt, max_new_tokens, **kwargs)

    # -- life cycle ---------------------------------------------------------------------------
    def _keep_workers_alive(self):
        """Idle workers wait at most `timeout` for the next header: ping them well within it."""
        while not self._closed and not self._broken:
            every = self.boundary.timeout.total_seconds() / 4
            time.sleep(min(every / 4, 1.0))
            if time.monotonic() - self._last_sent < every or not self._lock.acquire(blocking=False):
                continue
            try:
                if not self._closed and not self._broken:
                    self._send(Header(OP_PING))
            except PipelineError as e:
                self._broken = str(e)
            finally:
                self._lock.release()

    def close(self):
        """Tell the workers to exit and leave the process group. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            if not self._broken and len(self.split) > 1:
                try:
                    for pending in list(self._in_flight):      # e.g. Stopped between two submits
                        self._finish(pending)
                    self.boundary.send_header(Header(OP_SHUTDOWN))
                except PipelineError:
                    pass
        if not self._broken:
            dist.destroy_process_group()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def decode_interleaved(model, prompt, max_new_tokens, groups=None, sampling=None, seed=None):
    """Generate for B streams split into `groups` groups (default: one per stage) that never wait
    for each other: as soon as a group's logits arrive its next token is sampled and submitted, so
    every stage stays busy across decode steps (generate() waits for all streams at each step).

    prompt: token ids [B, T]. Returns {"tokens": [B][max_new_tokens], "prefill_s", "decode_s"}.
    The tokens equal generate()'s with the same sampling and seed (groups draw in stream order;
    each stream runs the library's StreamLoop)."""
    ids = model.stage.model.check_tokens(prompt)
    B = ids.shape[0]
    sampler = Sampler(sampling or SamplingParams(temperature=0), B, model.vocab_size, model.device, seed)
    loops = sampler.loops(max_new_tokens)
    g = max(1, min(groups or len(model.split), B))
    rows = [(B * i // g, B * (i + 1) // g) for i in range(g)]
    states = [model.new_state(r1 - r0) for r0, r1 in rows]
    t0 = time.perf_counter()
    pending = [model.submit(ids[r0:r1], st, micro_batches=1) for (r0, r1), st in zip(rows, states)]
    prefill_s = None
    for step in range(max_new_tokens):
        for k, ((r0, r1), st) in enumerate(zip(rows, states)):
            chosen = sampler(pending[k].result(), step, rows=(r0, r1))
            for loop, token in zip(loops[r0:r1], chosen.tolist()):
                loop.take(token)
            if step < max_new_tokens - 1:
                pending[k] = model.submit(chosen[:, None], st, micro_batches=1)
        if step == 0:
            prefill_s = time.perf_counter() - t0
    return {"tokens": [loop.tokens for loop in loops], "prefill_s": prefill_s,
            "decode_s": time.perf_counter() - t0 - prefill_s}


# ---------------------------------------------------------------------------------------------
# Start-up: load this rank's slice, check that every rank agrees, then serve

def _checkpoint_path(name_or_path, checkpoint, seed, local_rank):
    """The checkpoint file this rank reads. Synthetic weights of a registered name are written
    once per host (by local rank 0) while the others wait."""
    name, path = resolve(name_or_path, checkpoint)
    if path is not None:
        return path
    if local_rank == 0:
        write_synthetic(name, seed=seed)
    dist.barrier()
    return write_synthetic(name, seed=seed)


def fingerprint(entries, cfg):
    """A hash of the checkpoint every rank must share: the config, every tensor's name, shape and
    dtype (entries: open_checkpoint's listing), and a few values (ln_out.weight: two checkpoints
    of the same shapes differ there)."""
    h = hashlib.sha256(json.dumps([cfg.n_layer, cfg.n_embd, cfg.vocab_size, cfg.ffn_dim, cfg.layer_norm_eps,
                                   sorted((k, list(shape), str(dtype)) for k, (shape, dtype, _) in entries.items())
                                   ]).encode())
    if "ln_out.weight" in entries:
        h.update(entries["ln_out.weight"][2]().float().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def _agree(info, what):
    """all_gather this rank's info dict; raise the first rank's error (every rank raises the same, at the
    same point, so every rank also leaves the process group here: exiting with it still up ended some
    ranks in a C++ std::terminate from gloo's threads instead of the one-line error)."""
    infos = [None] * dist.get_world_size()
    dist.all_gather_object(infos, info)
    errors = [(r, i["error"]) for r, i in enumerate(infos) if i.get("error")]
    if errors:
        r, e = errors[0]
        dist.destroy_process_group()
        raise PipelineError(f"rank {r} ({infos[r]['host']}): {e}" if what == "load" else e)
    return infos


def _check_same_checkpoint(infos):
    """Every rank sees the same infos, so every rank raises (and leaves the group) together."""
    try:
        _compare_ranks(infos)
    except PipelineError:
        if dist.is_initialized():
            dist.destroy_process_group()
        raise


def _compare_ranks(infos):
    ref = infos[0]
    for r, i in enumerate(infos):
        if i["args"] != ref["args"]:
            raise PipelineError(f"ranks were started with different arguments: rank {r} ({i['host']}) has "
                                f"{i['args']} but rank 0 ({ref['host']}) has {ref['args']}")
    for r, i in enumerate(infos):
        if i["hash"] != ref["hash"]:
            raise PipelineError(f"checkpoints differ across ranks: rank {r} ({i['host']}) has {i['path']} "
                                f"[{i['summary']}, hash {i['hash']}] but rank 0 ({ref['host']}) has {ref['path']} "
                                f"[{ref['summary']}, hash {ref['hash']}]")


@dataclass(frozen=True)
class PipelineOptions:
    """How the ranks run one model (pipeline.load's keywords besides the model's own LoadOptions and
    its checkpoint); see `load`."""
    layers_per_rank: "list | None" = None
    micro_batches: "int | None" = None
    prompt_chunk: "int | None" = None
    timeout_s: float = 60.0
    load_timeout_s: float = 600.0
    backend: "str | None" = None
    threads: "int | None" = None

    def __post_init__(self):
        for name in ("micro_batches", "prompt_chunk"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise PipelineError(f"{name} must be an int >= 1, got {value!r}")


def load(name_or_path, *, exit_workers=True, **kwargs):
    """Start this rank's part of a pipeline (call it on every rank, as launched by torchrun).

    Returns the PipelinedRWKV on rank 0. On other ranks it serves until rank 0 closes the pipeline,
    then exits the process; a failure there prints one line naming the rank at fault and exits
    with status 1 (with exit_workers=False: returns the Worker after shutdown, raises PipelineError).
    Every rank checks before any work that the layer split fits the model and that all ranks have
    the same checkpoint.

    checkpoint, device, dtype, seed: as rwkv_engine.load (device None: cuda:LOCAL_RANK with nccl, else
    cpu). The rest are PipelineOptions: layers_per_rank: e.g. [10, 10, 12] (default: even).
    micro_batches, prompt_chunk: see PipelinedRWKV. timeout_s bounds every wait once running (a dead
    or hung rank -> PipelineError naming it, on every rank); load_timeout_s bounds start-up (loading,
    the first forward that pages the weights in). backend: gloo or nccl (default nccl when CUDA is
    available). threads: torch threads of this rank (default: its share of the host's cores).
    """
    if int(os.environ.get("RANK", 0)) != 0:
        _outlive_stop_signals()
    try:
        return _load(name_or_path, *split_options(kwargs), exit_workers=exit_workers)
    except (PipelineError, ValueError) as e:
        if int(os.environ.get("RANK", 0)) == 0 or not exit_workers:
            raise
        print(f"rwkv_engine.pipeline: rank {os.environ['RANK']}: error: {e}", file=sys.stderr, flush=True)
        os._exit(1)                 # not sys.exit: a broken process group can hang in its destructor


def split_options(kwargs):
    """pipeline.load's keywords -> (checkpoint, seed, LoadOptions, PipelineOptions); an unknown
    keyword is a TypeError naming it."""
    kw = dict(kwargs)
    checkpoint, seed = kw.pop("checkpoint", None), kw.pop("seed", 0)
    model = LoadOptions(device=kw.pop("device", None), dtype=kw.pop("dtype", "float32"))
    unknown = sorted(set(kw) - {f.name for f in fields(PipelineOptions)})
    if unknown:
        raise TypeError(f"pipeline.load() got an unexpected keyword argument {unknown[0]!r}")
    return checkpoint, seed, model, PipelineOptions(**kw)


def _load(name_or_path, checkpoint, seed, options: LoadOptions, run: PipelineOptions, exit_workers=True):
    if dist.is_initialized():
        raise PipelineError("pipeline.load initialises torch.distributed itself (with the store faults are "
                            "reported in): call it before any init_process_group")
    store = init(run.backend, run.load_timeout_s)
    rank, world = dist.get_rank(), dist.get_world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    if options.device is None:
        options = replace(options, device=f"cuda:{local_rank}" if dist.get_backend() == "nccl" else "cpu")
    torch.set_num_threads(run.threads or max(1, usable_cores() // local_world))     # ranks share a host's cores
    path = _checkpoint_path(name_or_path, checkpoint, seed, local_rank)
    split = _agree_on_checkpoint(path, options, run, world)
    stage = _load_stage(name_or_path, checkpoint, seed, replace(options, layers=split[rank]), store, run)
    if rank == 0:
        pipe = PipelinedRWKV(stage, split, run.micro_batches, run.prompt_chunk)
        pipe.forward([[0]])                  # pages every rank's weights in, under the start-up timeout
        stage.boundary.timeout = datetime.timedelta(seconds=run.timeout_s)
        atexit.register(pipe.close)
        return pipe
    worker = Worker(stage, datetime.timedelta(seconds=run.timeout_s))
    worker.run()
    dist.destroy_process_group()
    if exit_workers:
        raise SystemExit(0)
    return worker


def _agree_on_checkpoint(path, options, run, world):
    """Every rank reads its checkpoint's listing; all must agree (arguments, checkpoint) -> the split."""
    info = {"host": hostname(), "path": str(path), "error": None,
            "args": {"dtype": str(as_dtype(options.dtype)).replace("torch.", ""),
                     "layers_per_rank": run.layers_per_rank}}
    split = None
    try:
        entries, cfg = open_checkpoint(path)
        info.update(hash=fingerprint(entries, cfg),
                    summary=f"{cfg.n_layer} layers, n_embd {cfg.n_embd}, vocab {cfg.vocab_size}")
        split = split_layers(cfg.n_layer, world, run.layers_per_rank)
    except (ValueError, PipelineError) as e:
        info["error"] = str(e)
    _check_same_checkpoint(_agree(info, "config"))
    return split


def _load_stage(name_or_path, checkpoint, seed, options, store, run):
    """Load this rank's layers (every rank learns whether all loaded) -> its Stage."""
    info = {"host": hostname(), "process": process_token(), "error": None}
    try:
        model = load_model(name_or_path, checkpoint=checkpoint, seed=seed, options=options)
    except (ValueError, OSError, RuntimeError, MemoryError) as e:
        info["error"] = f"{type(e).__name__}: {e}" if isinstance(e, MemoryError) else str(e)
    infos = _agree(info, "load")
    boundary = Boundary(store, options.device, run.load_timeout_s)
    boundary.hosts = {r: i["host"] for r, i in enumerate(infos)}
    boundary.processes = {r: i["process"] for r, i in enumerate(infos)}
    return Stage(model, boundary)
