"""python -m rwkv_engine.launch [torchrun's options] -m MODULE [ARGS]: torchrun that stops cleanly.

torchrun that receives SIGTERM or SIGINT (Ctrl-C reaches every process of the terminal's group)
forwards the signal to its ranks and then reports the signal as its own failure: exit status 1
and a `SignalException` traceback, even when every rank shut down cleanly. This launcher runs
torchrun unchanged, as a child in its own session, and on SIGTERM / SIGINT signals the ranks
themselves (torchrun's children): they drain (a pipeline server finishes its requests, rank 0
shuts the workers down) and exit, torchrun sees its ranks finish and exits with their status, and
so does this launcher: 0 when every rank exited 0. A second signal is passed to torchrun itself
(its own handling: forward and give up after its shutdown timeout); a third kills the session.

Every option is torchrun's (`python -m torch.distributed.run --help`), on every node as with
torchrun:

    python -m rwkv_engine.launch --standalone --nproc-per-node 2 -m rwkv_engine.serve --model rwkv-4-pile-169m --pipeline
"""
import os
import signal
import subprocess
import sys

import psutil

from .process import die_with_parent

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def ranks_of(pid):
    """The processes torchrun started (its direct children: one per local rank)."""
    try:
        return psutil.Process(pid).children()
    except psutil.Error:
        return []


class Launcher:
    def __init__(self, argv):
        self.proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", *argv], start_new_session=True,
                                     preexec_fn=die_with_parent)      # SIGTERM if the launcher dies: no orphan
        self.signals = 0

    def on_signal(self, signum, _frame):
        self.signals += 1
        if self.signals == 1:
            targets = ranks_of(self.proc.pid)
            for rank in targets:
                try:
                    rank.send_signal(signum)
                except psutil.Error:
                    pass
            if targets:
                return
        if self.signals <= 2:
            self.proc.send_signal(signum)         # no rank yet (still starting), or asked twice
        else:
            os.killpg(self.proc.pid, signal.SIGKILL)

    def wait(self):
        for sig in STOP_SIGNALS:
            signal.signal(sig, self.on_signal)
        code = self.proc.wait()
        return 128 - code if code < 0 else code     # killed by a signal: the shell's convention


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        print("rwkv_engine.launch: give torchrun's options and the command, e.g. --standalone "
              "--nproc-per-node 2 -m rwkv_engine.serve --model rwkv-4-pile-169m --pipeline", file=sys.stderr)
        return 2
    if argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        return 0
    return Launcher(argv).wait()


if __name__ == "__main__":
    sys.exit(main())
