import subprocess
import sys

import pytest

from omnigrpo.rewards.registry import (
    BUILTIN_JUDGES,
    Registry,
    RewardNotFound,
    build_reward,
    builtin_rewards,
    is_reward_function,
    resolve_reward,
)


def test_builtins_are_registered_where_the_registry_looks_for_them():
    assert sorted(BUILTIN_JUDGES) == builtin_rewards()  # no judge registers a name the map does not know
    assert {"shapes", "shapes_strict"} <= set(BUILTIN_JUDGES)


def test_an_unknown_name_is_refused_without_importing_any_judge():
    code = ("import sys\nfrom omnigrpo.rewards.registry import RewardNotFound, resolve_reward\n"
            "try:\n    resolve_reward('shapez')\nexcept RewardNotFound as err:\n    print(err)\n"
            "print(sorted(m for m in sys.modules if m.startswith(('omnigrpo.rewards.judges', 'open_clip', "
            "'rapidocr', 'scipy'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "Did you mean 'shapes'" in out and out.strip().endswith("[]"), out


def test_duplicate_names_are_refused():
    reg = Registry("reward")
    reg.register("x")(lambda: None)
    with pytest.raises(ValueError, match="already registered"):
        reg.register("x")(lambda: None)


def test_unknown_name_suggests_the_closest():
    with pytest.raises(RewardNotFound, match="Did you mean 'shapes'"):
        resolve_reward("shapez")


def test_a_file_path_is_never_executed(tmp_path):
    evil = tmp_path / "evil.py"
    evil.write_text("raise SystemExit('executed')\n")
    with pytest.raises(RewardNotFound, match="file paths are never executed"):
        resolve_reward(f"{evil}:fn")


def test_module_attr_errors_name_the_problem(tmp_path, monkeypatch):
    (tmp_path / "plug.py").write_text("def fn(images, prompts, metadata):\n    return [1.0] * len(images)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert build_reward("plug:fn")([0, 0], ["a", "b"], [{}, {}]) == [1.0, 1.0]
    with pytest.raises(RewardNotFound, match="has no attribute 'nope'"):
        resolve_reward("plug:nope")
    with pytest.raises(RewardNotFound, match="cannot import module 'no_such_module_x'"):
        resolve_reward("no_such_module_x:fn")


def test_entry_point_plugins_are_found(tmp_path, monkeypatch):
    # An installed distribution is a *.dist-info folder on sys.path with an entry_points.txt.
    (tmp_path / "acme_rewards.py").write_text(
        "def make(scale=1.0):\n    return lambda images, prompts, metadata: [scale] * len(images)\n"
    )
    info = tmp_path / "acme_rewards-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: acme-rewards\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[omnigrpo.rewards]\nacme = acme_rewards:make\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    fn = build_reward("acme", {"scale": 0.3})
    assert fn([0, 0, 0], ["p"] * 3, [{}] * 3) == [0.3, 0.3, 0.3]


def test_function_or_factory_rule():
    def reward(images, prompts, metadata):
        return []

    def factory(threshold=0.5):
        return reward

    assert is_reward_function(reward) and not is_reward_function(factory)
    assert not is_reward_function(Registry)  # a class is a factory


def test_factory_returning_a_non_callable_is_an_error(tmp_path, monkeypatch):
    (tmp_path / "bad.py").write_text("def make():\n    return 42\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(TypeError, match="returned int, not a callable"):
        build_reward("bad:make")
