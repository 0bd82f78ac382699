"""``kushi config example`` (src/kushi/example.toml): valid, complete and truthful.

The example must parse, mention every config key, and state the real defaults: loading it
gives the same config as loading nothing, except for the admin listener, which the example
turns on. The commented-out [[listener]] examples must parse too once uncommented.
"""

from __future__ import annotations

import re
from dataclasses import fields
from importlib.resources import files
from pathlib import Path

import pytest

from kushi.cli import main
from kushi.config import DERIVED_KEYS, Address, Config, Limits, Listener, Timeouts, load_config

pytestmark = pytest.mark.timeout(30)

EXAMPLE = files("kushi").joinpath("example.toml")
TEXT = EXAMPLE.read_text(encoding="utf-8")
#: Config fields that are not keys of the file.
NOT_KEYS = {"listeners", "source", "warnings", "users"} | DERIVED_KEYS


def example_path(tmp_path: Path, text: str = TEXT) -> str:
    path = tmp_path / "kushi.toml"
    path.write_text(text, encoding="utf-8")
    return str(path)


def mentioned_keys(text: str) -> set[str]:
    """Keys set on a line of their own, commented out or not (``# key = value``)."""
    return set(re.findall(r"^(?:# )?([a-z0-9_]+) = ", text, flags=re.MULTILINE))


def test_the_example_parses(tmp_path: Path) -> None:
    config = load_config(example_path(tmp_path))
    assert [(c.name, c.mode) for c in config.listeners] == [("forward", "forward")]


def test_every_key_appears() -> None:
    keys = mentioned_keys(TEXT)
    for cls in (Listener, Config, Timeouts, Limits):
        missing = {f.name for f in fields(cls)} - NOT_KEYS - {"timeouts", "limits"} - keys
        assert not missing, f"{cls.__name__} keys missing from example.toml: {sorted(missing)}"
    assert "[timeouts]" in TEXT and "[limits]" in TEXT and "# [[listener]]" in TEXT
    assert "# source = [" in TEXT and "# [users.alice]" in TEXT


def test_the_example_states_the_defaults(tmp_path: Path) -> None:
    example = load_config(example_path(tmp_path))
    default = load_config(None)
    for f in fields(Config):
        if f.name in NOT_KEYS | {"admin_listen"}:
            continue
        assert getattr(example, f.name) == getattr(default, f.name), f.name
    assert example.listeners[0] == default.listeners[0]
    # The example turns the admin listener on at its documented address.
    assert example.admin_listen == (Address("127.0.0.1", 9128),)
    assert default.admin_listen == example.admin_listen


def test_the_commented_listener_tables_parse(tmp_path: Path) -> None:
    tables = TEXT[TEXT.index("# [[listener]]") :]
    uncommented = "\n".join(
        line[2:] if line.startswith("# ") else "" for line in tables.splitlines()
    )
    config = load_config(example_path(tmp_path, uncommented))
    assert [(c.name, c.mode) for c in config.listeners] == [
        ("proxy", "forward"),
        ("socks", "socks"),
        ("web", "reverse"),
        ("mail", "tcp"),
    ]
    assert config.listener("mail").backend_proxy_protocol == 2
    assert config.listener("socks").connect_ports == frozenset({22, 80, 443, 993})
    # Tables inherit nothing they did not set: the defaults above apply.
    assert config.listener("web").egress == "prefer-ipv6"


def test_kushi_config_example_prints_it(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config", "example"]) == 0
    assert capsys.readouterr().out == TEXT
