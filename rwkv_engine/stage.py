"""The stage boundary of the pipeline: every message between ranks goes through this module
(Megatron's `p2p_communication`), over torch.distributed point-to-point send/recv.

Messages: rank 0 sends a small int64 header to every worker at the start of each operation
(`TAG_HEADER`); hidden states x flow rank r -> r + 1 (`TAG_X`); the last rank sends logits back to
rank 0 (`TAG_LOGITS`). Each (peer, tag) channel is FIFO, so items are matched by order.

Every wait is bounded by `timeout`, a worker's wait for the next operation too (rank 0 pings idle
workers well within it); start-up collectives by the process group's (longer) timeout. A failure
becomes one `PipelineError` that names the rank at fault, decided from the reports every rank that
noticed the failure leaves in the rendezvous store (see `Boundary.fail`). gloo does not always see
a killed peer's socket close; a rank that times out first looks the ranks of its own machine up in
/proc (`process_gone`), so a dead local rank is reported as dead, not as hung.

gloo (CPU) is what this has run on. With NCCL the same calls carry CUDA tensors, and `init` sets
TORCH_NCCL_BLOCKING_WAIT=1 so that `work.wait(timeout)` blocks and times out on the host
(untested on hardware).
"""
import datetime
import os
import socket
import time

from typing import NamedTuple

import torch
import torch.distributed as dist

TAG_HEADER, TAG_X, TAG_LOGITS = 1, 2, 3


class Header(NamedTuple):
    """What rank 0 tells every worker at the start of an operation; one int64 per field on the
    wire, then the length of the operation's payload (a list of ints, e.g. stream indices)."""
    op: int                      # pipeline.OP_*
    state: int = 0               # the state the operation reads: forward, free, clone / select source
    new_state: int = 0           # the state it makes: new, clone, select, cat
    batch: int = 0               # streams: of the new state, or the tokens' B of a forward
    length: int = 0              # the tokens' T of a forward
    all_logits: int = 0          # a forward returns every position's logits (0 / 1)
    micro_batches: int = 0       # a forward's micro-batches
    prompt_chunk: int = 0        # a forward's prompt chunk (0: none)


HEADER_LEN = len(Header._fields) + 1             # the fields, then the payload's length
FAULT_GRACE_S = 2.0          # how long a rank that saw a failure waits for the others' reports


class PipelineError(RuntimeError):
    """The pipeline cannot go on (or cannot start); the message names the rank at fault."""


def _kind_of(error):
    """Classify a torch.distributed error: "died" (connection gone) or "timeout"."""
    text = str(error).lower()
    if "timed out" in text or ("timeout" in text and "closure" not in text):
        return "timeout"
    return "died"


class Boundary:
    """This rank's end of the pipeline: rank, neighbours, device for messages, timeouts."""

    def __init__(self, store, device, timeout_s):
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.prev = self.rank - 1 if self.rank > 0 else None
        self.next = self.rank + 1 if self.rank < self.world - 1 else None
        self.last = self.world - 1
        self.device = torch.device(device)
        self.timeout = datetime.timedelta(seconds=timeout_s)
        self.store = store
        self.hosts = {}          # rank -> hostname, filled by the start-up check
        self.processes = {}      # rank -> process_token(), filled by the start-up check

    # -- headers: rank 0 -> every worker ----------------------------------------------------
    def send_header(self, header: Header, payload=()):
        """Rank 0 -> every worker: the header, then `payload` (a list of ints), whose length travels
        in the wire header's last field."""
        header = torch.tensor([*header, len(payload)], dtype=torch.int64, device=self.device)
        tensors = [header] + ([torch.tensor(payload, dtype=torch.int64, device=self.device)] if payload else [])
        works = [self.send(t, dst, TAG_HEADER) for dst in range(1, self.world) for t in tensors]
        self.wait_all(works, tensors)

    def recv_header(self):
        """Worker: wait for rank 0's next header (rank 0 pings idle workers well within the timeout)
        -> (Header, payload)."""
        header = torch.empty(HEADER_LEN, dtype=torch.int64, device=self.device)
        try:
            dist.irecv(header, 0, tag=TAG_HEADER).wait(self.timeout)
        except RuntimeError as e:
            self.fail(0, _kind_of(e), idle=True)
        *fields, n_payload = header.tolist()
        if n_payload == 0:
            return Header(*fields), []
        payload = self.wait(self.post_recv((n_payload,), torch.int64, 0, TAG_HEADER))
        return Header(*fields), payload.tolist()

    # -- data -------------------------------------------------------------------------------
    def post_recv(self, shape, dtype, src, tag):
        """Start receiving a tensor; `wait` returns it."""
        buf = torch.empty(shape, dtype=dtype, device=self.device)
        try:
            return src, dist.irecv(buf, src, tag=tag), buf
        except RuntimeError as e:            # gloo refuses to post on a pair whose peer is gone
            self.fail(src, _kind_of(e))

    def wait(self, pending):
        src, work, buf = pending
        try:
            work.wait(self.timeout)
        except RuntimeError as e:
            self.fail(src, _kind_of(e))
        return buf

    def send(self, tensor, dst, tag):
        """Start sending; keep the returned handle (and the tensor) until `wait_all`."""
        tensor = tensor.contiguous()
        try:
            return dst, dist.isend(tensor, dst, tag=tag), tensor
        except RuntimeError as e:            # gloo refuses to post on a pair whose peer is gone
            self.fail(dst, _kind_of(e))

    def wait_all(self, works, *keep_alive):
        for item in works:
            dst, work = item[0], item[1]
            try:
                work.wait(self.timeout)
            except RuntimeError as e:
                self.fail(dst, _kind_of(e))

    # -- faults -----------------------------------------------------------------------------
    def where(self, rank):
        host = self.hosts.get(rank)
        return f"rank {rank}" + (f" ({host})" if host else "")

    def describe(self, peer, kind, idle=False):
        if kind == "died":
            return f"{self.where(peer)} died: its connection to {self.where(self.rank)} closed"
        what = "sent nothing (not even a keep-alive) for" if idle else "did not answer within"
        return f"{self.where(peer)} {what} {self.timeout.total_seconds():g} s (hung or unreachable)"

    def fail(self, peer, kind, detail="", idle=False):
        """Report what this rank saw, wait briefly for the other ranks' reports, raise the verdict.

        kind "error": this rank itself failed (detail says how); "died": the connection to `peer`
        closed; "timeout": `peer` did not answer in time. The verdict prefers a rank's own error,
        then a closed connection (first-hand), then the earliest rank in the chain that timed out
        waiting for its predecessor (the ranks after it were only waiting on it)."""
        own = f"{self.where(self.rank)} failed: {detail}" if kind == "error" else self.describe(peer, kind, idle)
        if kind == "timeout":            # gloo can miss a dead peer's closed socket: ask this machine
            gone = next((r for r in sorted(self.processes, key=lambda r: (r != peer, r))
                         if r != self.rank and process_gone(self.processes[r])), None)
            if gone is not None:
                pid = self.processes[gone].split(":")[2]
                peer, kind, own = gone, "died", f"{self.where(gone)} died: its process (pid {pid}) has exited"
        reports = {self.rank: (kind, peer, own)}
        try:
            self.store.set(f"fault/{self.rank}", f"{kind}|{peer}|{own}")
            deadline = time.monotonic() + FAULT_GRACE_S
            self._collect(reports)
            while time.monotonic() < deadline and _undecided(reports):
                time.sleep(0.05)
                self._collect(reports)
        except Exception:            # the store went down with its host: keep our own diagnosis
            pass
        raise PipelineError(verdict(reports))

    def _collect(self, reports):
        for r in range(self.world):
            if r not in reports and self.store.check([f"fault/{r}"]):
                k, p, msg = self.store.get(f"fault/{r}").decode().split("|", 2)
                reports[r] = (k, int(p), msg)


def _undecided(reports):
    """Worth waiting for more reports: every report is a timeout (the rank at fault may not be the
    one we waited on), or a closed connection to a peer whose own report has not arrived yet (a
    rank that timed out on its predecessor exits, and its neighbours see it close first)."""
    if all(k == "timeout" for k, _, _ in reports.values()):
        return True
    return any(k == "died" and peer not in reports for k, peer, _ in reports.values())


def verdict(reports):
    """rank -> (kind, peer, message) -> the one message naming the rank at fault.

    A rank's own error first. Else a report about a peer that filed no report itself (a rank that
    reported was alive, so losing it was a consequence), a closed connection before a timeout, and
    a worker's report before rank 0's (rank 0 waits on the end of the chain, a worker on the rank
    just before it)."""
    errors = sorted(r for r, (k, _, _) in reports.items() if k == "error")
    if errors:
        return reports[errors[0]][2]
    silent = [r for r, (_, peer, _) in reports.items() if peer not in reports]
    for kind in ("died", "timeout"):
        hits = sorted((r for r in silent if reports[r][0] == kind), key=lambda r: (r == 0, r))
        if hits:
            return reports[hits[0]][2]
    return reports[min(reports)][2]


# ---------------------------------------------------------------------------------------------
# Start-up

def init(backend=None, timeout_s=60.0):
    """Join the process group torchrun (or a test) described in the environment (RANK, WORLD_SIZE,
    MASTER_ADDR, MASTER_PORT) and return the store faults are reported in.

    backend: "gloo" (CPU) or "nccl" (CUDA); default gloo unless CUDA is available."""
    for var in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        if var not in os.environ:
            raise PipelineError(f"environment variable {var} is not set: launch with torchrun "
                                "(e.g. torchrun --standalone --nproc-per-node 2 -m ...)")
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    timeout = datetime.timedelta(seconds=timeout_s)
    # torchrun's agent hosts the store (TORCHELASTIC_USE_AGENT_STORE); otherwise rank 0 does
    agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true"
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world,
                          is_master=(rank == 0 and not agent_store), timeout=timeout)
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        os.environ.setdefault("TORCH_NCCL_BLOCKING_WAIT", "1")      # wait(timeout) times out on the host
    dist.init_process_group(backend, store=dist.PrefixStore("rwkv_pg/", store), rank=rank,
                            world_size=world, timeout=timeout)
    fault_store = dist.PrefixStore("rwkv_pipeline/", store)
    fault_store.set_timeout(datetime.timedelta(seconds=FAULT_GRACE_S))
    return fault_store


def hostname():
    return socket.gethostname()


def _read(path):
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return None


def _start_time(stat):
    """/proc/PID/stat -> (state, start time in clock ticks); the name (field 2) may hold spaces."""
    fields = stat[stat.rindex(")") + 2:].split()
    return fields[0], fields[19]


def process_token(pid=None):
    """This process (or `pid`) as "boot id:pid namespace:pid:start time", or "" where /proc does not
    say (not Linux). Two tokens with the same boot id and pid namespace name processes another
    process can look up in its own /proc; the start time tells a reused pid from the original."""
    pid = os.getpid() if pid is None else pid
    boot, stat = _read("/proc/sys/kernel/random/boot_id"), _read(f"/proc/{pid}/stat")
    try:
        ns = os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return ""
    if not boot or not stat:
        return ""
    return f"{boot.strip()}:{ns}:{pid}:{_start_time(stat)[1]}"


def process_gone(token):
    """True when `token` (process_token) names a process of this machine and pid namespace that has
    exited (gone, or a zombie not yet reaped); False when it runs or when this machine cannot tell
    (another machine or namespace, no /proc)."""
    mine = process_token()
    if not token or not mine or token.split(":")[:2] != mine.split(":")[:2]:
        return False
    pid, started = token.split(":")[2:]
    stat = _read(f"/proc/{pid}/stat")
    if stat is None:
        return True
    state, start = _start_time(stat)
    return state in ("Z", "X") or start != started
