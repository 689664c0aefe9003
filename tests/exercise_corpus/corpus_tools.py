"""How the corpus files register their answers: @wrong(exercise, mistake, must_not=...) on a
backward written as a learner would, tagged with the catalogue key of the mistake it makes
(or "recogniser" / "generic" when no catalogued mistake fits) and the words its report must
not contain; @right(exercise) on a correct backward written differently from the answer key."""
from dataclasses import dataclass


@dataclass
class Entry:
    exercise: str
    mistake: str | None      # None for a right answer
    must_not: tuple
    backward: object
    forward: object = None   # a learner's own forward (that saves more), when not the sheet's


ENTRIES: list = []
# Claims no report of a catalogued mistake may make: the fallback (the mistake is known), the old
# fallback's unverified "not transposed", "may only inherit" by list order, "does not average".
NEVER = ("no simple pattern", "not transposed,", "may only inherit", "does not average")


def wrong(exercise, mistake, must_not=(), forward=None):
    """must_not: words this answer's report must not contain, on top of NEVER."""
    never = NEVER if mistake not in ("recogniser", "generic") else NEVER[1:]
    def add(backward):
        ENTRIES.append(Entry(exercise, mistake, tuple(dict.fromkeys((*must_not, *never))), backward, forward))
        return backward
    return add


def right(exercise, forward=None):
    def add(backward):
        ENTRIES.append(Entry(exercise, None, (), backward, forward))
        return backward
    return add
