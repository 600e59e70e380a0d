"""A ``chunk-ops`` process with hooks in its write path, so tests force the interleavings
that defects need instead of hoping for them.

    python -m tests.chunk_ops.write_hooks worker --queue ...

The process stops itself (SIGSTOP; the test resumes it with SIGCONT, or kills it):

- ``HOOK_STOP_BEFORE_MERGE_WRITE=1``: once, in its first merge, after the partial sums
  are read and blended and before anything is written;
- ``HOOK_STOP_IN_WRITE=<folder>``: once, right after it opens a file below ``<folder>``
  for writing, before a byte is written (a writer killed there leaves what the write
  path leaves: a truncated file, or only a temporary one).

The hooks wrap functions every version of chunk_ops has (``stages.cast_output`` and
Python's ``open``), so the same test runs against the code before and after a fix.
"""

from __future__ import annotations

import builtins
import os
import signal
import sys


def _stop_self() -> None:
    os.kill(os.getpid(), signal.SIGSTOP)


def install() -> None:
    if os.environ.get("HOOK_STOP_BEFORE_MERGE_WRITE"):
        from chunk_ops import stages

        cast = stages.cast_output
        armed = [True]

        def cast_then_stop(values, dtype):
            result = cast(values, dtype)
            if armed[0]:
                armed[0] = False
                _stop_self()
            return result

        stages.cast_output = cast_then_stop

    folder = os.environ.get("HOOK_STOP_IN_WRITE")
    if folder:
        real_open = builtins.open
        armed_write = [True]

        def open_then_stop(file, mode="r", *args, **kwargs):
            handle = real_open(file, mode, *args, **kwargs)
            if (armed_write[0] and isinstance(file, (str, os.PathLike)) and "w" in str(mode)
                    and os.path.abspath(file).startswith(folder.rstrip("/") + "/")):
                armed_write[0] = False
                _stop_self()
            return handle

        builtins.open = open_then_stop


if __name__ == "__main__":
    install()
    from chunk_ops.cli import main

    sys.argv[0] = "chunk-ops"
    sys.exit(main())
