"""Class labels as people type them: an id, a name, or any synonym of a name.

A label resolves to a class id when it is
* a class name or a synonym of exactly one class (case and surrounding space ignored),
* or a class id written as a string of ASCII digits (at most 19, like any seed),
  when no class is named so (the demo's classes are named "0" to "9").
Otherwise `UnknownClass` carries suggestions: every class when the model has few,
else the classes whose names or synonyms come closest (word containment first,
then difflib's similarity ratio).
"""

from __future__ import annotations

import difflib
import re

FEW_CLASSES = 20  # up to this many classes an unknown name lists them all
DIGITS = re.compile(r"[0-9]{1,19}")  # ASCII only: str.isdigit() also accepts "²", which int() refuses


class UnknownClass(ValueError):
    def __init__(self, message: str, suggestions: list[str]):
        super().__init__(message)
        self.suggestions = suggestions


class ClassIndex:
    def __init__(self, names: list[str], synonyms: list[list[str]] | None = None):
        """`synonyms[i]`: other names of class i (the class name itself may be among them)."""
        self.names = list(names)
        self._exact: dict[str, int] = {n.lower(): i for i, n in enumerate(self.names)}
        owners: dict[str, set[int]] = {}
        for i, row in enumerate(synonyms or []):
            for s in row:
                owners.setdefault(_norm(s), set()).add(i)
        # A synonym shared by several classes ("crane": bird and machine) resolves nothing by itself.
        self._synonym = {s: next(iter(ids)) for s, ids in owners.items() if len(ids) == 1 and s not in self._exact}
        self._shared = {s: sorted(ids) for s, ids in owners.items() if len(ids) > 1}
        self._all = {**{_norm(n): [i] for i, n in enumerate(self.names)}, **{s: [i] for s, i in self._synonym.items()},
                     **self._shared}

    def __len__(self) -> int:
        return len(self.names)

    def resolve(self, label: int | str) -> int:
        if isinstance(label, int):
            if not 0 <= label < len(self.names):
                raise UnknownClass(f"class id {label} is out of range [0, {len(self.names)})", [])
            return label
        key = _norm(label)
        if key in self._exact:
            return self._exact[key]
        if key in self._synonym:
            return self._synonym[key]
        if DIGITS.fullmatch(label):
            return self.resolve(int(label))
        if key in self._shared:
            options = [self.names[i] for i in self._shared[key]]
            raise UnknownClass(f"class name {_shown(label)} names several classes: {options}", options)
        return_all = len(self.names) <= FEW_CLASSES
        raise UnknownClass(
            f"unknown class name {_shown(label)}" + (f"; this model's classes are {self.names}" if return_all else ""),
            list(self.names) if return_all else self.suggest(label),
        )

    def suggest(self, label: str, n: int = 5) -> list[str]:
        """Names of the classes whose name or a synonym is closest to `label`."""
        key = _norm(label)
        if not key or len(key) > 100:  # no class name is that long
            return []
        scored: dict[int, float] = {}
        words = re.compile(rf"\b{re.escape(key)}\b")
        matcher = difflib.SequenceMatcher()
        matcher.set_seq2(key)  # difflib caches what it learns about seq2
        for name, ids in self._all.items():
            if words.search(name):  # "great white" is inside "great white shark": above any ratio
                score = 1.0 + len(key) / len(name)
            else:
                matcher.set_seq1(name)
                # the cheap upper bounds first, as difflib.get_close_matches does
                score = matcher.ratio() if matcher.real_quick_ratio() >= 0.6 and matcher.quick_ratio() >= 0.6 else 0.0
            for i in ids:
                scored[i] = max(scored.get(i, 0.0), score)
        # When some names contain the words, those alone: "shark" suggests sharks, not "hare".
        floor = 1.0 if any(s > 1.0 for s in scored.values()) else 0.6
        best = sorted((i for i, s in scored.items() if s >= floor), key=lambda i: (-scored[i], i))[:n]
        return [self.names[i] for i in best]


def _shown(label: str, most: int = 64) -> str:
    """The label as an error message repeats it: bounded, whatever a client sent."""
    return repr(label) if len(label) <= most else repr(label[:most]) + f"... ({len(label)} characters)"


def _norm(text: str) -> str:
    return " ".join(text.split()).lower()
