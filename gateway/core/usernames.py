"""User names that read alike: the ledger names every actor, so two users whose
names a reader can confuse (``bilal`` and ``bi1al``, ``asma`` and ``a.sma``) would
make its account of who did what ambiguous (MOC item 8).

Pure. Names are already restricted to ``[a-z0-9._@-]`` (``gateway.node.users``),
so the confusions left are those of digits with letters, of letter pairs with one
letter, and of the separators: :func:`name_skeleton` maps each name to a form in
which such pairs coincide, and :func:`confusable_with` finds an existing name with
the same form.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Final

__all__ = ["confusable_with", "name_skeleton"]

_PAIRS: Final = (("rn", "m"), ("vv", "w"), ("cl", "d"))
_SINGLE: Final = str.maketrans({"0": "o", "1": "l", "i": "l", "5": "s", "2": "z", "8": "b"})
_SEPARATORS: Final = str.maketrans("", "", "._-")


def name_skeleton(name: str) -> str:
    """The form of ``name`` two confusable names share: separators dropped, ``rn``
    read as ``m``, ``vv`` as ``w``, ``cl`` as ``d``, and ``0 1 i 5 2 8`` as ``o l l
    s z b``. Equal skeletons mean a reader could take one name for the other."""
    text = name.lower().translate(_SEPARATORS)
    for pair, single in _PAIRS:
        text = text.replace(pair, single)
    return text.translate(_SINGLE)


def confusable_with(name: str, existing: Iterable[str]) -> str | None:
    """The first of ``existing`` (other than ``name`` itself) that reads like
    ``name`` (:func:`name_skeleton`), or ``None``."""
    wanted = name_skeleton(name)
    for other in existing:
        if other != name and name_skeleton(other) == wanted:
            return other
    return None
