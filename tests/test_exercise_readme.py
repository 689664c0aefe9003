"""The README's walk-through quotes what the tour (scripts/backprop_tour.py) really prints: the
exercise check of the first try, and every `file.py:<line> in function` of the anomaly report.
It quotes no line number (they drift as code moves), only the file and function."""
import importlib.util
import re
from pathlib import Path

import pytest

from tinygpt import exercises

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
WALK_THROUGH = README[README.index("## Watching backprop"):README.index("\n## ", README.index("## Watching backprop") + 3)]


@pytest.fixture(scope="module")
def tour():
    spec = importlib.util.spec_from_file_location("backprop_tour", ROOT / "scripts" / "backprop_tour.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def quoted_block(after: str) -> list:
    """The lines of the first ``` block after the text `after` in the README."""
    rest = WALK_THROUGH[WALK_THROUGH.index(after):]
    block = rest.split("```\n", 2)[1]
    return block.rstrip("\n").splitlines()


def test_readme_quotes_the_exercise_check_the_tour_makes(tour, tmp_path):
    path = exercises.start("layer_norm", tmp_path)
    path.write_text(re.sub(r"    raise NotImplementedError\(.*\)\n", lambda _: tour.WRONG, path.read_text()))
    report = exercises.run_check("layer_norm", path).report(2).splitlines()
    quoted = quoted_block("**Write the backward yourself.**")
    assert report[-len(quoted):] == quoted


def test_the_readme_quotes_no_line_number_and_the_places_the_tour_prints(tour, capsys):
    assert not re.findall(r"\w\.py:\d+", WALK_THROUGH), "a quoted line number drifts as code moves: write <line>"
    quoted = re.findall(r"[\w/]+\.py:<line> in \w+", WALK_THROUGH)
    assert quoted, "the walk-through quotes source places; this test keeps them true"
    tour.find_a_nan()
    printed = re.sub(r"(\.py):\d+ in", r"\1:<line> in", capsys.readouterr().out)
    for where in quoted:
        assert where in printed, f"README.md quotes {where}; the tour prints: " + "; ".join(
            re.findall(r"[\w/]+\.py:<line> in \w+", printed))
