"""Class labels by number or by name: ``207,"golden retriever",0-3`` -> [207, 207, 0, 1, 2, 3].

Models with ImageNet's 1000 classes take the names of runtime/assets/imagenet/classes.tsv (each
class's WordNet synonyms, in DiT's label order; where the list comes from is in the README
beside it). Other models (the bundled digits DiT) take numbers only. A name matches any synonym
of a class, ignoring case and repeated spaces. A name that belongs to two classes ("crane": the
bird and the machine) or to none is refused, naming the candidates or the closest names.
"""
from __future__ import annotations

import difflib
import re
from functools import lru_cache
from importlib import resources

IMAGENET_CLASSES = 1000
_RANGE = re.compile(r"\s*([0-9]+)\s*-\s*([0-9]+)\s*", re.ASCII)
_NUMBER = re.compile(r"\s*[0-9]+\s*", re.ASCII)


def _normal(name: str) -> str:
    return " ".join(name.lower().split())


@lru_cache(maxsize=1)
def imagenet_names() -> tuple[tuple[str, ...], ...]:
    """Per class index 0..999, its names (the first is the usual one)."""
    text = (resources.files("freedit.runtime") / "assets" / "imagenet" / "classes.tsv").read_text(encoding="utf-8")
    rows = [line.split("\t") for line in text.splitlines() if line]
    if [int(r[0]) for r in rows] != list(range(IMAGENET_CLASSES)):
        raise RuntimeError("runtime/assets/imagenet/classes.tsv is damaged: reinstall freedit")
    return tuple(tuple(n.strip() for n in r[2].split(",")) for r in rows)


@lru_cache(maxsize=1)
def _index() -> dict[str, tuple[int, ...]]:
    found: dict[str, list[int]] = {}
    for i, names in enumerate(imagenet_names()):
        for name in names:
            found.setdefault(_normal(name), [])
            if i not in found[_normal(name)]:
                found[_normal(name)].append(i)
    return {k: tuple(v) for k, v in found.items()}


def class_name(index: int, num_classes: int) -> str:
    """A readable name for a label: ImageNet's first synonym, else the number."""
    return imagenet_names()[index][0] if num_classes == IMAGENET_CLASSES else str(index)


def lookup(name: str) -> int:
    """The ImageNet class index of ``name``; ValueError with the candidates or the closest names."""
    key = _normal(name.strip().strip("\"'"))
    hits = _index().get(key, ())
    if len(hits) == 1:
        return hits[0]
    if hits:
        options = " or ".join(f"{i} ({', '.join(imagenet_names()[i][:3])})" for i in hits)
        raise ValueError(f"class name {name!r} is ambiguous: {options}; give the number")
    close = difflib.get_close_matches(key, _index(), n=4, cutoff=0.6)
    hint = ("; close matches: " + ", ".join(f"{c!r} ({_index()[c][0]})" for c in close)) if close \
        else "; see runtime/assets/imagenet/classes.tsv"
    raise ValueError(f"unknown ImageNet class name {name!r}{hint}")


def count_classes(text: str) -> int:
    """How many labels ``text`` asks for (a range counts its length), without expanding anything:
    a request is sized before a model is loaded or a list is built."""
    total = 0
    for part in text.split(","):
        bounds = _RANGE.fullmatch(part)
        total += int(bounds[2]) - int(bounds[1]) + 1 if bounds and int(bounds[2]) >= int(bounds[1]) else 1
    return total


def parse_classes(text: str, num_classes: int) -> list[int]:
    """A comma list of numbers, ranges 'a-b' and (for ImageNet models) names -> class indices, each checked."""
    labels: list[int] = []
    for part in text.split(","):
        bounds = _RANGE.fullmatch(part)
        if bounds:
            lo, hi = int(bounds[1]), int(bounds[2])
            if lo > hi:
                raise ValueError(f"classes {text!r}: range {part.strip()!r} is empty (write it low-high)")
            labels += range(lo, min(hi, num_classes) + 1)  # past the last class: refused below, never expanded
        elif _NUMBER.fullmatch(part):  # ASCII digits only (int() also takes other scripts' digits)
            labels.append(int(part))
        elif num_classes == IMAGENET_CLASSES and part.strip():
            labels.append(lookup(part))
        else:
            what = "numbers or ImageNet class names" if num_classes == IMAGENET_CLASSES else \
                f"integers (digits 0-9) such as '0-{num_classes - 1}' or '1,4,7' (class names are for ImageNet models)"
            raise ValueError(f"classes {text!r}: {part.strip()!r} is not a class; expected {what}")
    bad = sorted({y for y in labels if not 0 <= y < num_classes})
    if bad:
        raise ValueError(f"unknown class label(s) {bad[:10]}; this model has classes 0..{num_classes - 1}")
    return labels
