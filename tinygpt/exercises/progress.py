"""Which exercises a learner has passed, kept in a small JSON file in their exercise folder
(no network, nothing outside that folder). A pass is written only after the checker has
verified every gradient."""
from __future__ import annotations

import json
from pathlib import Path

from tinygpt.files import atomic_write_text

FILE = ".tinygpt-exercises.json"


def passed(folder) -> set:
    """The names of the exercises passed in `folder` (empty when none, or the file is unreadable)."""
    try:
        data = json.loads((Path(folder) / FILE).read_text())
    except (OSError, ValueError):
        return set()
    names = data.get("passed") if isinstance(data, dict) else None
    return {n for n in names if isinstance(n, str)} if isinstance(names, list) else set()


def record(folder, name: str) -> None:
    """Add `name` to the passes of `folder`; a folder that cannot be written is left as it is."""
    done = passed(folder) | {name}
    try:
        atomic_write_text(Path(folder) / FILE, json.dumps({"passed": sorted(done)}, indent=1) + "\n")
    except OSError:
        pass
