"""The failures that are not bugs in tinygpt, at the bottom of the house so that any layer
can raise them.

`tinygpt` prints these as one line and exits 1: the user can act on the message (install
CuPy, pass a local file, lower the learning rate, pick another checkpoint). Every other
exception out of a command is a broken invariant of tinygpt's own code, and keeps its
traceback (cli.py). A mistake in the command line itself is a `validation.UsageError`
(exit 2); a bad value passed to a function is a ValueError or TypeError.
"""


class RunError(RuntimeError):
    """A run cannot go on for a reason outside tinygpt's code: a missing library, GPU or
    network, a broken checkpoint, a locked run folder, a diverged loss, an anomaly found."""
