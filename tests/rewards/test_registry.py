import subprocess
import sys
from pathlib import Path

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


@pytest.mark.parametrize("module, body, error", [
    ("exits_at_import", "import sys\nsys.exit(0)\n", "SystemExit: 0"),
    ("raises_at_import", "raise RuntimeError('no GPU here')\n", "RuntimeError: no GPU here"),
    ("keyerror_at_import", "raise KeyError('token')\n", "KeyError: 'token'"),
])
def test_a_plugin_that_fails_or_exits_at_import_is_not_found_naming_the_error(module, body, error, tmp_path,
                                                                               monkeypatch):
    (tmp_path / f"{module}.py").write_text(body)
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(RewardNotFound, match=f"reward '{module}:fn': importing '{module}' failed: {error}"):
        resolve_reward(f"{module}:fn")


def test_an_entry_point_that_exits_at_import_is_not_found(tmp_path, monkeypatch):
    (tmp_path / "quitter.py").write_text("raise SystemExit(3)\n")
    info = tmp_path / "quitter-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: quitter\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[omnigrpo.rewards]\nquitter = quitter:make\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(RewardNotFound, match="reward 'quitter': importing 'quitter:make' failed: SystemExit: 3"):
        resolve_reward("quitter")


def test_a_module_whose_attribute_lookup_exits_is_not_found(tmp_path, monkeypatch):
    (tmp_path / "lookup_exits.py").write_text("import sys\n\ndef __getattr__(name):\n    sys.exit(0)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(RewardNotFound, match="reward 'lookup_exits:fn': importing 'lookup_exits' failed: SystemExit"):
        resolve_reward("lookup_exits:fn")


def test_an_attribute_that_is_not_callable_is_refused(plugins):
    with pytest.raises(RewardNotFound, match="reward 'odd_scores:CONSTANT' resolved to int 3, which is not callable"):
        resolve_reward("odd_scores:CONSTANT")


@pytest.mark.parametrize("reward, needle", [
    ("exits_now:fn", "rewards.1.name: reward 'exits_now:fn': importing 'exits_now' failed: SystemExit: 0"),
    ("odd_scores:CONSTANT", "rewards.1.name: reward 'odd_scores:CONSTANT' resolved to int 3, which is not callable"),
])
def test_train_refuses_such_a_plugin_before_anything_starts(reward, needle, plugins, tmp_path, capsys, monkeypatch):
    from conftest import refused

    from omnigrpo.cli import main
    from omnigrpo.cluster import environment

    (tmp_path / "exits_now.py").write_text("import sys\nsys.exit(0)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(environment, "prepare_local_ray_env", lambda *a: pytest.fail("train got past its checks"))
    config = str(Path(__file__).parents[2] / "configs" / "shapes.yaml")
    refused(main, ["train", config, f"run.dir={tmp_path / 'run'}", f"rewards=[{{name: shapes}}, {{name: '{reward}'}}]"],
            capsys, needle)
    assert not (tmp_path / "run").exists()
