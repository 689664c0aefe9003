"""The text `tinygpt train` and `tinygpt trace` use when given no --data."""
from __future__ import annotations

from tinygpt.errors import RunError


def default_corpus() -> str:
    """The reference text that ships with CPython (pydoc_data.topics): ~465,000 characters
    of English about Python, present on any machine with Python and no download."""
    try:
        from pydoc_data.topics import topics
    except ImportError:
        raise RunError("this Python has no pydoc_data module (the default training text); pass --data FILE") from None
    return "\n\n".join(topics[key] for key in sorted(topics))
