import functools
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import leftovers

from omnigrpo.cli import main
from omnigrpo.config.loader import ConfigError, load_config, to_dict, with_overrides

CONFIG_DIR = Path(__file__).parents[2] / "configs"
CONFIGS = sorted(CONFIG_DIR.glob("*.yaml"))
SHAPES = str(CONFIG_DIR / "shapes.yaml")


def test_there_are_shipped_configs():
    assert CONFIGS, "configs/ is empty"


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_shipped_config_loads(path):
    cfg = load_config(path)
    assert cfg.rewards and cfg.rollout.group_size >= 2
    loaded = to_dict(cfg)
    for key, value in _leaves(yaml.safe_load(path.read_text())):  # every value the file sets is the one in force
        section, *rest = key.split(".")
        assert functools.reduce(lambda d, k: d[int(k)] if isinstance(d, list) else d[k], rest, loaded[section]) == (
            value), key


def _leaves(data: object, prefix: str = "") -> list[tuple[str, object]]:
    if isinstance(data, dict):
        return [leaf for k, v in data.items() for leaf in _leaves(v, f"{prefix}{k}.")]
    if isinstance(data, list) and data and isinstance(data[0], dict):
        return [leaf for i, v in enumerate(data) for leaf in _leaves(v, f"{prefix}{i}.")]
    return [(prefix.rstrip("."), data)]


def test_overrides_are_typed_and_nested():
    cfg = load_config(None, ["trainer.lr=1e-5", "rollout.group_size=4", "trainer.scale_rewards=false",
                             "rewards=[{name: shapes, weight: 2}]", "rewards.0.required=false"])
    assert cfg.trainer.lr == pytest.approx(1e-5) and isinstance(cfg.trainer.lr, float)
    assert cfg.rollout.group_size == 4
    assert cfg.trainer.scale_rewards is False
    assert cfg.rewards[0].weight == 2.0 and cfg.rewards[0].required is False


def test_yaml_exponent_without_dot_still_parses_as_float(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("trainer:\n  lr: 1e-6\n")  # PyYAML reads this as a string
    assert load_config(path).trainer.lr == pytest.approx(1e-6)


def test_configs_are_frozen():
    cfg = load_config()
    with pytest.raises(Exception, match="frozen|cannot assign"):
        cfg.trainer.lr = 1.0


@pytest.mark.parametrize(
    "override, message",
    [
        ("rollout.grop_size=4", "rollout.grop_size: unknown key (did you mean rollout.group_size?)"),
        ("trainr.lr=1", "trainr: unknown key (did you mean trainer?)"),
        ("rollout.group_size=1", "rollout.group_size: Input should be greater than or equal to 2"),
        ("trainer.lr=-0.1", "trainer.lr: Input should be greater than 0"),
        ("rollout.temperature=hot", "rollout.temperature: Input should be a valid number"),
        ("model.family=dalle", "model.family: Input should be 'builtin'"),
        ("rewards=[{name: shapes, wieght: 2}]", "rewards.0.wieght: unknown key (did you mean rewards.0.weight?)"),
        ("trainer.micro_batch_size=7", "micro_batch_size: 7 must divide each learner's share of a mini-batch, 64"),
        ("rewards=[{name: shapes}, {name: shapes}]", "'shapes' is listed twice"),
        ("rewards=[]", "at least one reward"),
        ("trainer.tis_cap=2", "trainer.tis_cap: 2 needs trainer.old_logprobs: learner"),
    ],
)
def test_bad_configs_name_the_key(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert message in str(err.value)


def test_typed_overrides_of_a_loaded_config_are_validated_like_the_command_line():
    cfg = load_config(SHAPES, ["trainer.lr=1e-5"])
    changed = with_overrides(cfg, {"cluster.placement": "hybrid", "rewards.0.weight": 2})
    assert changed.cluster.placement == "hybrid" and changed.rewards[0].weight == 2.0
    assert changed.trainer.lr == cfg.trainer.lr and cfg.cluster.placement == "colocated"
    with pytest.raises(ConfigError, match="trainer.max_stalenes: unknown key"):
        with_overrides(cfg, {"trainer.max_stalenes": 1})
    with pytest.raises(ConfigError, match="cluster.placement: Input should be"):
        with_overrides(cfg, {"cluster.placement": "scattered"})


def test_malformed_override_is_refused():
    with pytest.raises(ConfigError, match="key.sub=value"):
        load_config(None, ["trainer.lr"])


def test_cli_fails_before_any_cluster_or_run_dir(tmp_path, capsys):
    run_dir = tmp_path / "never"
    code = main(["train", SHAPES, "rollout.group_sise=4", f"run.dir={run_dir}"])
    assert code == 2
    assert "did you mean rollout.group_size?" in capsys.readouterr().err
    assert not leftovers()
    assert not run_dir.exists()


def test_cli_unknown_reward_fails_before_cluster(tmp_path):
    """Refused before Ray, MLflow, the model libraries or any judge is imported (seconds on a loaded box)."""
    heavy = ("ray", "mlflow", "transformers", "deepspeed", "open_clip", "omnigrpo.rewards.judges")
    argv = ["train", SHAPES, "rewards=[{name: shapez}]", f"run.dir={tmp_path / 'r'}"]
    code = (f"import sys\nfrom omnigrpo.cli import main\nprint(main({argv!r}))\n"
            f"print(sorted(m for m in sys.modules if m.startswith({heavy!r})))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.stdout.split() == ["2", "[]"], proc.stdout + proc.stderr
    assert "omnigrpo: rewards.0.name: unknown reward 'shapez'" in proc.stderr and "Did you mean 'shapes'" in proc.stderr
    assert not (tmp_path / "r").exists()


def test_cli_check_prints_resolved_config(capsys):
    assert main(["train", SHAPES, "--check", "trainer.steps=3"]) == 0
    assert '"steps": 3' in capsys.readouterr().out


def test_help_lists_the_commands(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert "{train,sft,eval,bench,plan,curves,submit,status,logs,stop,tiny,serve-reward}" in out
    assert "omnigrpo train configs/shapes.yaml" in out
