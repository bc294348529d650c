"""Class labels by number or ImageNet name; unknown, ambiguous and out-of-range ones refused in one line."""
from __future__ import annotations

import subprocess
import sys
import time

import pytest

from freedit.runtime.class_names import class_name, imagenet_names, lookup, parse_classes


def test_the_1000_imagenet_names_in_dits_label_order():
    names = imagenet_names()
    assert len(names) == 1000 and all(names)
    assert names[0][0] == "tench" and names[207][0] == "golden retriever" and names[999][0] == "toilet tissue"
    assert class_name(207, 1000) == "golden retriever" and class_name(3, 10) == "3"


def test_names_resolve_whatever_the_case_spacing_or_synonym():
    assert lookup("golden retriever") == lookup("  Golden   Retriever ") == lookup('"golden retriever"') == 207
    assert lookup("Tinca tinca") == 0  # a synonym on class 0's line
    assert parse_classes('207,"golden retriever",0-2, tench', 1000) == [207, 207, 0, 1, 2, 0]


def test_ambiguous_and_unknown_names():
    with pytest.raises(ValueError, match=r"'crane' is ambiguous: 134 \(crane\) or 517 \(crane\); give the number"):
        lookup("crane")
    with pytest.raises(ValueError, match=r"unknown ImageNet class name 'golden retreiver'; close matches: "
                                         r"'golden retriever' \(207\)"):
        lookup("golden retreiver")


def test_numbers_only_for_other_models_and_ranges_checked_before_expanding():
    assert parse_classes("0-9", 10) == list(range(10))
    with pytest.raises(ValueError, match=r"'tench' is not a class; expected integers \(digits 0-9\) such as '0-9'.*ImageNet models"):
        parse_classes("1,tench", 10)
    with pytest.raises(ValueError, match=r"unknown class label\(s\) \[1000\]; this model has classes 0..999"):
        parse_classes("207,1000", 1000)
    start = time.perf_counter()
    with pytest.raises(ValueError, match=r"unknown class label\(s\) \[10\]"):
        parse_classes("0-1000000000", 10)  # never builds a billion labels
    assert time.perf_counter() - start < 1
    with pytest.raises(ValueError, match="range '9-3' is empty"):
        parse_classes("9-3", 10)


@pytest.mark.parametrize("classes, message", [
    ("207,1000", r"unknown class label\(s\) \[1000\]; this model has classes 0..999"),
    ("golden retreiver", r"close matches: 'golden retriever' \(207\)"),
    ("crane", "is ambiguous"),
])
def test_cli_refuses_bad_classes(tiny_latent_dir, tmp_path, classes, message):
    out = subprocess.run([sys.executable, "-m", "freedit", "generate", "--model", str(tiny_latent_dir), "--classes",
                          classes, "--out", str(tmp_path / "g.png"), "--no-progress"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1 and "Traceback" not in out.stderr
    assert __import__("re").search(message, out.stderr), out.stderr
    assert not list(tmp_path.iterdir())
