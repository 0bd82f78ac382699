"""Which form of kushi a test run uses: ``make test`` runs the tests on the editable,
pure-Python source and again on the mypyc-compiled wheel (KUSHI_COMPILED=1, the wheel on
PYTHONPATH). Each run checks it really has the form it says, so the compiled run cannot
quietly test the source."""

from __future__ import annotations

import os
import tomllib
from pathlib import Path

from kushi.server import COMPILED_MODULES, build_form

ROOT = Path(__file__).resolve().parents[2]


def test_the_compiled_modules_are_the_ones_the_wheel_build_compiles() -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    hook = pyproject["tool"]["hatch"]["build"]["targets"]["wheel"]["hooks"]["mypyc"]
    assert sorted(hook["include"]) == sorted(f"src/kushi/{m}.py" for m in COMPILED_MODULES)


def test_this_run_has_the_form_it_was_asked_for() -> None:
    compiled = os.environ.get("KUSHI_COMPILED") == "1"
    hint = "" if compiled else " (left by `pip install .` in this tree? make clean)"
    assert build_form() == ("mypyc-compiled" if compiled else "pure Python"), hint
