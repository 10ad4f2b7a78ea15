"""Bad input as a new user types it: every key with a wrong type and with an out-of-range value, broken YAML,
duplicate keys, malformed overrides, secrets in URLs. Each ends in ``omnigrpo:`` lines naming the key or the
file and line, exit status 2, no traceback, before anything starts."""

from __future__ import annotations

import dataclasses
import functools
import os
import subprocess
import sys
import time
import types
import typing
from pathlib import Path

import annotated_types
import pytest
from conftest import refused

from omnigrpo.cli import main
from omnigrpo.config.loader import ConfigError, load_config
from omnigrpo.config.schema import Config

SHAPES = str(Path(__file__).parents[2] / "configs" / "shapes.yaml")
_refused = functools.partial(refused, main)


def _leaves(cls: type, prefix: str = "") -> list[tuple[str, object]]:
    """``(dotted key, annotation)`` of every field; a list of sections contributes its first item's keys."""
    out = []
    for f in dataclasses.fields(cls):
        hint = typing.get_type_hints(cls, include_extras=True)[f.name]
        inner = typing.get_args(hint)[0] if typing.get_origin(hint) is list else hint
        if dataclasses.is_dataclass(inner):
            out += _leaves(inner, f"{prefix}{f.name}.0." if inner is not hint else f"{prefix}{f.name}.")
        else:
            out.append((f"{prefix}{f.name}", hint))
    return out


KEYS = _leaves(Config)


def _wrong_type(hint: object) -> str:
    base = typing.get_args(hint)[0] if typing.get_origin(hint) is typing.Annotated else hint
    return "[1, 2]" if typing.get_origin(base) is dict else "{not: right}"


def _out_of_range(hint: object) -> str | None:
    """A value of the right type outside the key's declared range (None: the key has no range)."""
    if typing.get_origin(hint) is typing.Literal:
        return "no-such-choice"
    if typing.get_origin(hint) is not typing.Annotated:
        return None
    base, *meta = typing.get_args(hint)
    for m in meta:
        for bound in getattr(m, "metadata", [m]):
            if isinstance(bound, annotated_types.Ge | annotated_types.Gt):
                return str(base(bound.ge if isinstance(bound, annotated_types.Ge) else bound.gt) - 1)
            if isinstance(bound, annotated_types.Le | annotated_types.Lt):
                return str(base(bound.le if isinstance(bound, annotated_types.Le) else bound.lt) + 1)
            if isinstance(bound, annotated_types.MinLen):
                return "''"
    return None




def test_every_key_is_covered():
    assert len(KEYS) > 80 and "rewards.0.kwargs" in dict(KEYS) and "cluster.call_timeout_s" in dict(KEYS)
    assert "cluster.gpu_memory_gb" in dict(KEYS) and "rewards.0.memory_gb" in dict(KEYS)


@pytest.mark.parametrize("key, hint", KEYS, ids=[k for k, _ in KEYS])
def test_a_wrong_type_names_the_key(key, hint, capsys):
    _refused(["train", SHAPES, "--check", f"{key}={_wrong_type(hint)}"], capsys, key)


RANGED = [(k, v) for k, h in KEYS if (v := _out_of_range(h)) is not None]


@pytest.mark.parametrize("key, value", RANGED, ids=[k for k, _ in RANGED])
def test_an_out_of_range_value_names_the_key(key, value, capsys):
    _refused(["train", SHAPES, "--check", f"{key}={value}"], capsys, key)


FLOATS = [k for k, h in KEYS if float in (h, *typing.get_args(h), *[a for x in typing.get_args(h)
                                                                   for a in typing.get_args(x)])]


@pytest.mark.parametrize("key", FLOATS)
@pytest.mark.parametrize("value", [".nan", ".inf", "-.inf"])
def test_a_float_key_refuses_nan_and_infinity(key, value, capsys):
    _refused(["train", SHAPES, "--check", f"{key}={value}"], capsys, key, "finite number")


def test_every_float_key_is_checked_for_finiteness():
    assert len(FLOATS) > 20 and {"trainer.lr", "cluster.sync_timeout_s", "trainer.tis_cap"} <= set(FLOATS)


def test_ranged_keys_include_every_number(capsys):
    assert len(RANGED) > 60 and {"run.seed", "trainer.lr", "rollout.top_p", "model.family"} <= {k for k, _ in RANGED}


@pytest.mark.parametrize("text, needle", [
    ("trainer:\n  steps: 3\n  steps: 4\n", "c.yaml:3:3: key 'steps' is given twice (first on line 2)"),
    ("trainer:\n  lr: [1,\n", "c.yaml:3:1: not valid YAML"),
    ("- just\n- a list\n", "c.yaml:1: the top level must be a mapping"),
    ("trainer:\n  lr: -1\n", "c.yaml:2: trainer.lr: Input should be greater than 0"),
    ("rewards:\n  - name: shapes\n    wieght: 2\n", "c.yaml:3: rewards.0.wieght: unknown key (did you mean"),
    ("trainer: 5\n", "c.yaml:1: trainer: Input should be"),
    ("\tbad: tab\n", "not valid YAML"),
])
def test_a_bad_file_names_the_file_and_line(text, needle, tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    _refused(["train", str(path), "--check"], capsys, needle)


def test_missing_or_unreadable_files(tmp_path, capsys):
    _refused(["train", str(tmp_path / "none.yaml"), "--check"], capsys, "none.yaml: no such config file")
    (tmp_path / "bin.yaml").write_bytes(b"\xff\xfe\x00bad")
    _refused(["train", str(tmp_path / "bin.yaml"), "--check"], capsys, "bin.yaml: cannot read the config file")
    _refused(["train", str(tmp_path), "--check"], capsys, "cannot read the config file")


def test_an_override_replacing_a_file_value_is_not_blamed_on_the_file(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text("trainer:\n  lr: 0.1\n")
    err = _refused(["train", str(path), "--check", "trainer.lr=-1"], capsys, "trainer.lr: Input should be")
    assert "c.yaml:2" not in err


@pytest.mark.parametrize("override, needle", [
    ("trainer.lr", "is not of the form key.sub=value"),
    ("=3", "is not of the form key.sub=value"),
    ("trainer..lr=3", "is not of the form key.sub=value"),
    ("trainer.steps=[", "the value is not valid YAML"),
    ("trainer.lr.x=1", "trainer.lr is a value, not a section"),
    ("rewards.5.weight=1", "list index '5' out of range"),
    ("rewards.x.weight=1", "list index 'x' out of range"),
    ("run.seed=-1", "run.seed: Input should be greater than or equal to 0"),
    ("tracking.experiment=", "tracking.experiment"),
    ("trainer.lora_rank=4", None),
])
def test_a_bad_override_is_refused(override, needle, capsys):
    argv = ["train", SHAPES, "--check", override]
    if needle is None:  # a valid override, made invalid by the next one
        _refused([*argv, "trainer.lora_targets=[]"], capsys, "trainer.lora_targets: LoRA")
    else:
        _refused(argv, capsys, needle)


@pytest.mark.parametrize("override, key", [
    ("tracking.uri=http://alice:secret@127.0.0.1:5000", "tracking.uri: credentials in the URL"),
    ("cluster.address=ray://alice:secret@127.0.0.1:10001", "cluster.address: credentials"),
    ("rewards=[{name: 'url:http://alice:secret@127.0.0.1:9'}]", "rewards.0.name: credentials in the URL"),
    ("rewards=[{name: vlm_judge, kwargs: {base_url: 'http://a:b@127.0.0.1:9', model: m}}]",
     "rewards.0.kwargs.base_url: credentials"),
])
def test_a_secret_in_a_url_is_refused_and_not_echoed(override, key, capsys):
    assert "secret" not in _refused(["train", SHAPES, "--check", override], capsys, key)


def test_the_console_script_exits_2_without_a_traceback(tmp_path):
    script = Path(sys.executable).parent / "omnigrpo"
    bad = tmp_path / "c.yaml"
    bad.write_text("trainer:\n  steps: 1\n  steps: 2\n")
    proc = subprocess.run([str(script), "train", str(bad)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [f"omnigrpo: {bad}:3:3: key 'steps' is given twice (first on line 2)"]


LAUGHS = "".join(f"{c}: &{c} [{', '.join([f'*{p}'] * 9)}]\n" for p, c in zip("abcdefgh", "bcdefghi", strict=True))


@pytest.mark.parametrize("text, needle", [
    ("a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n" + LAUGHS, "aliases expand to over 100000 values"),
    ("run:\n  dir: x\nloop: &l [*l]\n", "c.yaml:3: a YAML alias refers to a value that holds it"),
    ("a: " + "[" * 20000 + "]" * 20000 + "\n", "c.yaml: its values are nested too deeply"),
])
def test_a_yaml_bomb_is_refused_at_once(text, needle, tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    start = time.monotonic()
    _refused(["train", str(path), "--check"], capsys, needle)
    assert time.monotonic() - start < 5


def test_a_yaml_bomb_in_an_override_is_refused(capsys):
    levels = ["&a [" + ", ".join(["lol"] * 9) + "]"] + [
        f"&{c} [" + ", ".join([f"*{p}"] * 9) + "]" for p, c in zip("abcdefgh", "bcdefghi", strict=True)]
    _refused(["train", SHAPES, "--check", f"rewards.0.kwargs={{x: [{', '.join(levels)}]}}"], capsys,
             "override rewards.0.kwargs: its YAML aliases expand to over 100000 values")
    deep = "[" * 20000 + "]" * 20000
    _refused(["train", SHAPES, "--check", f"rewards.0.kwargs={{x: {deep}}}"], capsys, "nested too deeply")


def test_a_config_that_is_a_fifo_or_a_device_is_refused_unopened(tmp_path):
    os.mkfifo(tmp_path / "c.yaml")  # opened, it would wait for a writer forever: the timeout fails the test
    (tmp_path / "zero.yaml").symlink_to("/dev/zero")  # read, it would fill memory
    for path, kind in ((tmp_path / "c.yaml", "a FIFO (named pipe)"), (tmp_path / "zero.yaml", "a character device")):
        proc = subprocess.run([sys.executable, "-m", "omnigrpo.cli", "train", str(path), "--check"],
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
        assert f"omnigrpo: cannot read the config file {path}: is {kind}" in proc.stderr, proc.stderr


def _is_number(hint: object) -> bool:
    """An int or float key (maybe Annotated, maybe optional); a list of numbers is not one."""
    if typing.get_origin(hint) is typing.Annotated:
        return _is_number(typing.get_args(hint)[0])
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return any(_is_number(h) for h in typing.get_args(hint))
    return hint in (int, float)


NUMBERS = [k for k, h in KEYS if _is_number(h)]


def test_every_number_key_is_checked_for_booleans():
    assert len(NUMBERS) > 60 and {"trainer.steps", "trainer.lr", "trainer.tis_cap", "rewards.0.weight"} <= set(NUMBERS)


@pytest.mark.parametrize("key", NUMBERS)
def test_a_boolean_is_not_a_number(key, capsys):
    # pydantic's lax mode reads true as 1: `trainer.steps=true` would run one step
    _refused(["train", SHAPES, "--check", f"{key}=true"], capsys, f"{key}: a number is needed, not a boolean")


def test_a_boolean_for_a_number_in_a_file_names_its_line(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text("trainer:\n  steps: true\nmodel:\n  image_grid: [2, false]\n")
    _refused(["train", str(path), "--check"], capsys, "c.yaml:2: trainer.steps: a number is needed, not a boolean",
             "c.yaml:4: model.image_grid.1: a number is needed")


@pytest.mark.parametrize("overrides, needle", [
    (["trainer.lr=1", "trainer.lr=2"], "override trainer.lr: given twice (1, then 2); give it once"),
    (["trainer.lr=1", " trainer.lr =2"], "override trainer.lr: given twice"),
    (["rewards.0.weight=2", "rewards=[{name: shapes}]"], "override rewards: replaces the whole of rewards after "
                                                         "override rewards.0.weight set a key in it"),
])
def test_an_override_given_twice_is_refused(overrides, needle, capsys):
    _refused(["train", SHAPES, "--check", *overrides], capsys, needle)


def test_the_same_override_twice_and_a_section_then_its_keys_are_accepted(capsys):
    assert main(["train", SHAPES, "--check", "--resume", "run.resume=true", "trainer={lr: 0.1}", "trainer.lr=0.2"]) == 0
    assert '"lr": 0.2' in capsys.readouterr().out


@pytest.mark.parametrize("override, needle", [
    ("rewards.².weight=1", "rewards"),  # "²".isdigit() is True, int("²") is not a number
    ("run.seed=" + "9" * 5000, "run.seed"),  # past Python's 4300 digits
    ("run.seed=2147483648", "run.seed"),  # seeds are 31-bit: the derived streams stay in range
])
def test_odd_override_paths_and_huge_numbers_are_refused_naming_the_key(override, needle):
    with pytest.raises(ConfigError, match=needle):
        load_config(None, [override])


def test_a_huge_integer_in_a_config_file_is_refused_naming_the_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("run:\n  seed: " + "9" * 5000 + "\n")
    with pytest.raises(ConfigError, match="c.yaml"):
        load_config(path)
