"""The README's walk-through quotes what the tour (scripts/backprop_tour.py) really prints: the
exercise check of the first try, and every `file.py:LINE in function` of the anomaly report, so
a line number that drifts when code moves fails here instead of misleading a reader."""
import importlib.util
import re
from pathlib import Path

import pytest

from tinygpt import exercises

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


@pytest.fixture(scope="module")
def tour():
    spec = importlib.util.spec_from_file_location("backprop_tour", ROOT / "scripts" / "backprop_tour.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def quoted_block(after: str) -> list:
    """The lines of the first ``` block after the text `after` in the README."""
    rest = README[README.index(after):]
    block = rest.split("```\n", 2)[1]
    return block.rstrip("\n").splitlines()


def test_readme_quotes_the_exercise_check_the_tour_makes(tour, tmp_path):
    path = exercises.start("layer_norm", tmp_path)
    path.write_text(re.sub(r"    raise NotImplementedError\(.*\)\n", lambda _: tour.WRONG, path.read_text()))
    report = exercises.run_check("layer_norm", path).report(2).splitlines()
    quoted = quoted_block("**Write the backward yourself.**")
    assert report[-len(quoted):] == quoted


def test_every_line_number_the_readme_quotes_is_the_one_the_tour_prints(tour, capsys):
    quoted = re.findall(r"[\w/]+\.py:\d+ in \w+", README)
    assert quoted, "the walk-through quotes source lines; this test keeps them true"
    tour.find_a_nan()
    printed = capsys.readouterr().out
    for where in quoted:
        assert where in printed, f"README.md quotes {where}; the tour now prints: " + "; ".join(
            re.findall(r"[\w/]+\.py:\d+ in \w+", printed))
