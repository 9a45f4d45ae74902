"""The top level every command shares (`python -m rwkv_engine.convert`, every `python -m bench.*`):
the project's own errors, wherever in the command they are raised (argument resolution, a first-use
write, a load, the last write), end it with one line `PROG: error: ...` on stderr and exit status 2;
Ctrl-C ends it with one line and status 130, without a traceback."""
import argparse
import functools
import sys

from .files import first_line


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports a bad argument in one line on stderr (exit code 2) and shows the
    description (a module docstring) as written in --help."""

    def __init__(self, **kwargs):
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(**kwargs)

    def error(self, message):
        self.exit(2, f"{self.prog.removeprefix('python -m ')}: error: {message}\n")


def user_errors():
    """What our checks raise with a message meant for the user: ValueError (CheckpointError, the
    config's and the arguments' checks), OSError (WriteError, a path the system refuses) and a
    pipeline's PipelineError."""
    from .stage import PipelineError
    return ValueError, OSError, PipelineError


def run_command(prog, main, *args, exit=True, **kwargs):
    """main(*args, **kwargs) -> what it returns. A user error prints `prog: error: <first line>` and
    gives status 2, Ctrl-C prints `prog: interrupted` and gives 130: raised as SystemExit when `exit`,
    else returned."""
    try:
        return main(*args, **kwargs)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        status = 130
    except user_errors() as e:
        print(f"{prog}: error: {first_line(e)}", file=sys.stderr)
        status = 2
    if exit:
        raise SystemExit(status)
    return status


def command(prog, exit=True):
    """Decorator: a command's main, run through `run_command`."""
    def wrap(main):
        @functools.wraps(main)
        def run(*args, **kwargs):
            return run_command(prog, main, *args, exit=exit, **kwargs)
        return run
    return wrap
