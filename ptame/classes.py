"""Class names: the model's list (given, from a file, or ImageNet's) and a class asked for by index or label."""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

import numpy as np

__all__ = ["PREDICTED", "imagenet_class_names", "read_class_names", "resolve_class"]

#: the class ``-1`` stands for each image's predicted class, wherever a class is given (``ptame explain
#: --classes``, a class column's rows, ``?class=`` of ``ptame serve``, the pyfunc's ``class`` param)
PREDICTED = -1


@lru_cache(maxsize=1)
def imagenet_class_names() -> tuple[str, ...]:
    """The 1000 ImageNet-1k class names (offline, from timm's bundled synset tables)."""
    from timm.data import ImageNetInfo

    info = ImageNetInfo()
    return tuple(info.index_to_description(i) for i in range(1000))


def read_class_names(names: Sequence[str] | str | Path | None) -> list[str] | None:
    """Class names given as a list, or as a text file with one name per line (``None`` stays ``None``).

    Raises:
        ValueError: an empty name (a blank line inside the file), or no names at all.
    """
    if names is None:
        return None
    if isinstance(names, (str, Path)):
        path = Path(names)
        if not path.is_file():
            raise FileNotFoundError(f"class names file not found: {path}")
        lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
        while lines and not lines[-1]:
            lines.pop()
        where = f"{path} line"
    else:
        if not all(isinstance(n, (str, int)) and not isinstance(n, bool) for n in names):
            raise TypeError(f"class names must be strings, got {list(names)[:5]!r}")
        lines, where = [str(n).strip() for n in names], "class name"
    if not lines:
        raise ValueError(f"no class names in {names!r}")
    blank = next((i for i, n in enumerate(lines) if not n), None)
    if blank is not None:
        raise ValueError(f"{where} {blank + 1} is empty: every class needs a name")
    return lines


def resolve_class(value: int | str, class_names: Sequence[str]) -> int | None:
    """A class given as an index or a label (``"3"``, ``"tabby"``) as an index, or ``None`` for
    :data:`PREDICTED` (``-1``: the prediction); ValueError names the choices."""
    if isinstance(value, bool):
        raise TypeError(f"class must be an index or a label, got {value!r}")
    text = str(value).strip()
    if isinstance(value, (int, np.integer)) or text.lstrip("-").isdigit():
        index = int(text)
        if index == PREDICTED:
            return None
        if not 0 <= index < len(class_names):
            raise ValueError(
                f"class {index} is out of range: this model has classes 0 to {len(class_names) - 1} (-1: the prediction)"
            )
        return index
    if text in class_names:
        return list(class_names).index(text)
    folded = [i for i, name in enumerate(class_names) if name.casefold() == text.casefold()]
    if len(folded) == 1:
        return folded[0]
    shown = ", ".join(repr(n) for n in list(class_names)[:5]) + (", ..." if len(class_names) > 5 else "")
    raise ValueError(f"unknown class {text!r}: give an index 0 to {len(class_names) - 1} or a label ({shown})")
