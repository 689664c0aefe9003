"""One engine per process: the parent's handle on a benchmark's worker.

A side-by-side benchmark runs each engine in a fresh interpreter of its own ("spawn": nothing of
the parent, or of torch, is inherited; torch's OpenMP threads would otherwise spin beside NumPy's
BLAS threads), and talks to it over a pipe: it sends a request, the worker answers
(kind, payload), or ("error", traceback) when it failed.
"""
from __future__ import annotations

import multiprocessing


class Worker:
    """target(*args, conn) running in its own process, and the parent's end of the pipe."""

    def __init__(self, engine: str, target, *args):
        context = multiprocessing.get_context("spawn")
        self.engine = engine
        self.conn, child_conn = context.Pipe()
        # daemon: if the run fails, the other workers end with this process instead of waiting
        self.process = context.Process(target=target, args=(*args, child_conn), name=f"{engine} worker", daemon=True)
        self.process.start()
        child_conn.close()  # so that recv() fails, instead of waiting forever, if the worker dies

    def receive(self, expected: str | None = None):
        """The payload of the worker's next answer (of kind `expected`, when given)."""
        try:
            kind, payload = self.conn.recv()
        except EOFError:
            raise RuntimeError(f"the {self.engine} worker died (exit code {self.process.exitcode}; "
                               "out of memory? try a smaller --batch or --tokens)") from None
        if kind == "error":
            raise RuntimeError(f"the {self.engine} worker failed:\n{payload}")
        assert expected is None or kind == expected, (kind, expected)
        return payload

    def ask(self, message, expected: str | None = None):
        self.conn.send(message)
        return self.receive(expected)

    def finish(self) -> None:
        """Tell the worker to end (its loop stops at any message it does not serve) and wait for it."""
        self.conn.send("finish")
        self.process.join()
