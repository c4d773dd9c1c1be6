"""Config loading is total (issue #13, deliver 6): for any file and any CRASHCART_* environment, Config.load
returns a Config or raises a CrashcartError with exit code 2 and a one-line message; never another exception.

The inputs are the real repair.example.toml, damaged: characters inserted, deleted and replaced (any Unicode,
bytes that are not UTF-8), the file cut short, values swapped for other TOML types (tables for strings, nan,
huge integers), keys and sections misspelt, and random environment overrides on top. A config that loads
must also write itself back (to_toml) and read back identical. Hypothesis runs a fixed, derandomized set
of examples, so CI sees the same ones every time.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from scripts.base.errors import CrashcartError, ExitCode
from scripts.config.model import Config
from scripts.config.sections import SECTIONS
from tests.support.synth import EXAMPLE, example_data

EXAMPLES = settings(max_examples=120, derandomize=True, deadline=None, database=None)
TEXT = EXAMPLE.read_text()
ENV_NAMES = sorted(f"CRASHCART_{s.upper()}_{f.upper()}" for s, cls in SECTIONS.items() for f in cls.model_fields)
ENV_NAMES += ["CRASHCART_TAGS", "CRASHCART_EXTRA_REGIONS", "CRASHCART_SOURCE", "CRASHCART_SOURCE_VMNAME",
              "CRASHCART_TAGS_TEAM", "crashcart_rescue_os"]

# values a hostile or careless hand tends to write
EDGE_STRINGS = ["", " ", "nan", "inf", "-inf", "1e999", "0", "-1", "true", "1_000", "\u0663", "\u00b2", "9" * 5000,
                "a,b", "k=v,k2", "=", "x:3", "westeurope:\u0663", "$(id)", "web\u202e01", "a\nb", "\x00", "\x1b[31m",
                "/subscriptions/", "10.0.0.0/8", "203.0.113.7/24", "Canonical:ubuntu:server:latest", "[1, 2]", "{}"]
scalars = st.one_of(
    st.text(max_size=24), st.sampled_from(EDGE_STRINGS), st.integers(), st.sampled_from([10**5000, 2**64, -2**63]),
    st.floats(allow_nan=True, allow_infinity=True), st.booleans(), st.datetimes(),
)
values = st.one_of(scalars, st.lists(scalars, max_size=3), st.dictionaries(st.text(max_size=6), scalars, max_size=3))


def load_outcome(load) -> Config | None:
    """The property: a Config, or a CrashcartError that is a usage error told in one printable line."""
    try:
        return load()
    except CrashcartError as err:
        assert err.exit_code == ExitCode.USAGE, err.message
        assert err.message.isprintable() and err.hint.isprintable(), repr((err.message, err.hint))
        return None


def reads_back_identical(config: Config, folder: Path, env: dict[str, str]) -> None:
    path = folder / "written.toml"
    path.write_text(config.to_toml("written by the property test"), encoding="utf-8")
    regions = {k: v for k, v in env.items() if k == "CRASHCART_EXTRA_REGIONS"}
    assert Config.load(path, env=regions) == config


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("config-properties")


# ---- the file, damaged as text ----------------------------------------------------------------------------
@st.composite
def damaged_text(draw) -> bytes:
    text = TEXT
    for _ in range(draw(st.integers(1, 4))):
        at = draw(st.integers(0, len(text)))
        action = draw(st.sampled_from(["insert", "delete", "replace-line-value", "cut"]))
        if action == "insert":
            text = text[:at] + draw(st.one_of(st.text(max_size=8), st.sampled_from(EDGE_STRINGS))) + text[at:]
        elif action == "delete":
            text = text[:at] + text[at + draw(st.integers(1, 40)):]
        elif action == "cut":
            text = text[:at]
        else:
            lines = text.splitlines()
            candidates = [i for i, line in enumerate(lines) if " = " in line]
            if candidates:
                i = draw(st.sampled_from(candidates))
                literal = draw(st.sampled_from(['"x"', "nan", "inf", "-0", "true", "[]", "{}", '{ a = 1 }', "1e999",
                                                "9" * 5000, '"\\u202e"', '"a\\nb"', "1979-05-27", "[[1], []]",
                                                '"\\u0000"', "0x7fffffffffffffff", "'''a\nb'''"]))
                lines[i] = lines[i].split(" = ")[0] + " = " + literal
                text = "\n".join(lines)
    data = text.encode("utf-8")
    if draw(st.booleans()) and draw(st.booleans()):
        at = draw(st.integers(0, len(data)))
        data = data[:at] + draw(st.binary(min_size=1, max_size=4)) + data[at:]
    return data


@EXAMPLES
@given(data=damaged_text())
def test_a_damaged_file_loads_or_is_a_usage_error(folder, data):
    path = folder / "damaged.toml"
    path.write_bytes(data)
    config = load_outcome(lambda: Config.load(path, env={}))
    if config is not None:
        reads_back_identical(config, folder, {})


# ---- the tables, with values of any type ------------------------------------------------------------------
@st.composite
def changed_tables(draw) -> dict[str, Any]:
    data = example_data()
    for _ in range(draw(st.integers(1, 4))):
        section = draw(st.sampled_from([*data, "tags", "extra"]))
        if draw(st.integers(0, 9)) == 0:
            data[section] = draw(values)  # a table swapped for a value (or a value for a table)
            continue
        table = data.setdefault(section, {})
        if not isinstance(table, dict):
            continue
        key = draw(st.one_of(st.sampled_from(sorted(table) or ["x"]), st.text(max_size=12)))
        table[key] = draw(values)
    return data


@EXAMPLES
@given(data=changed_tables())
def test_any_value_in_any_table_loads_or_is_a_usage_error(folder, data):
    config = load_outcome(lambda: Config.from_dict(data, env={}))
    if config is not None:
        reads_back_identical(config, folder, {})


# ---- the environment on top of the real file -------------------------------------------------------------
environments = st.dictionaries(
    st.one_of(st.sampled_from(ENV_NAMES), st.text(max_size=10).map(lambda s: "CRASHCART_" + s.upper())),
    st.one_of(st.text(max_size=30), st.sampled_from(EDGE_STRINGS)), max_size=4)


@EXAMPLES
@given(env=environments)
def test_any_environment_override_loads_or_is_a_usage_error(folder, env):
    config = load_outcome(lambda: Config.load(EXAMPLE, env=env))
    if config is not None:
        assert math.isfinite(config.source.memory_gb)
        reads_back_identical(config, folder, env)

