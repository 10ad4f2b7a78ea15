"""The shipped benchmark prompt sets load (also as plain prompt files and from an installed package), and the
train / held-out split is seeded, disjoint and the same in every process."""

import fnmatch
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from omnigrpo.app.preflight import check_run
from omnigrpo.config.loader import ConfigError
from omnigrpo.data.benchmarks import BENCHMARKS, FOLDER, benchmark_file, load_benchmark, split
from omnigrpo.data.prompts import load_prompts

ROOT = Path(__file__).parents[2]


@pytest.mark.parametrize(("name", "rows", "keys"), [
    ("geneval", 553, {"tag", "include"}),
    ("longtext", 160, {"category", "length", "text", "text_length", "prompt_id"}),
    ("longtext-zh", 160, {"category", "length", "text", "text_length", "prompt_id"}),
])
def test_shipped_sets_load_with_their_metadata(name, rows, keys):
    prompts, metadata = load_benchmark(name)
    assert len(prompts) == len(metadata) == rows == len(set(prompts))
    assert all(keys <= m.keys() and "prompt" not in m for m in metadata)
    assert (prompts, metadata) == load_prompts(str(benchmark_file(name)))  # the same through data.prompts


def test_nested_metadata_is_kept():
    _, geneval = load_benchmark("geneval")
    counting = next(m for m in geneval if m["tag"] == "counting")
    assert counting["include"][0]["count"] + 1 == counting["exclude"][0]["count"]
    assert {m["tag"] for m in geneval} == {"single_object", "two_object", "counting", "colors", "position",
                                           "color_attr"}
    _, longtext = load_benchmark("longtext-zh")
    assert longtext[0]["text"] == ["每日新鲜烘焙", "本地烘焙，始于1998", "中央公园 - 2公里"]
    assert {m["length"] for m in longtext} == {"short", "long"} and len({m["category"] for m in longtext}) == 8


def test_licences_and_sources_ship_as_package_data():
    assert (FOLDER / "geneval" / "LICENSE").read_text().startswith("MIT License")
    assert "Apache License" in (FOLDER / "longtext" / "LICENSE").read_text()
    sources = (FOLDER / "SOURCES.md").read_text()
    assert all(s in sources for s in ("djghosh13/geneval", "af4902f", "X-Omni-Team/X-Omni", "2b8237b"))
    patterns = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    shipped = [p.relative_to(FOLDER.parent).as_posix() for p in FOLDER.rglob("*") if p.is_file()]
    assert len(shipped) == 7 and {benchmark_file(n).name for n in BENCHMARKS} <= {Path(s).name for s in shipped}
    unpackaged = [s for s in shipped if not any(fnmatch.fnmatch(s, p) for p in patterns["omnigrpo.data"])]
    assert not unpackaged


def test_unknown_benchmark_names_the_known_ones():
    with pytest.raises(KeyError, match="geneval, longtext, longtext-zh"):
        load_benchmark("parti")


def test_split_is_disjoint_seeded_and_by_prompt():
    prompts, metadata = load_benchmark("geneval")
    (train, train_meta), (held, held_meta) = split(prompts, metadata, 0.2, seed=3)
    assert len(held) == round(0.2 * 553) and not set(train) & set(held)
    assert sorted(train + held) == sorted(prompts)
    assert held_meta == [metadata[prompts.index(p)] for p in held] and len(train_meta) == len(train)
    assert held == [p for p in prompts if p in set(held)]  # file order kept
    assert split(prompts, metadata, 0.2, seed=3)[1][0] == held
    assert split(prompts, metadata, 0.2, seed=4)[1][0] != held
    assert split(prompts, metadata, 0.0, seed=3) == ((prompts, metadata), ([], []))
    repeated = ["a", "b", "a", "c", "b", "a"]
    for seed in range(5):  # a repeated prompt lands on one side, all its copies
        train, held = split(repeated, [{}] * 6, 0.34, seed)
        assert len(set(held[0])) == 1 and len(held[0]) == repeated.count(held[0][0])


def test_split_is_the_same_in_another_process():
    code = ("from omnigrpo.data.benchmarks import load_benchmark, split; "
            "print(split(*load_benchmark('longtext'), 0.25, 7)[1][0][:5])")
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.strip() == str(split(*load_benchmark("longtext"), 0.25, 7)[1][0][:5])


def test_split_refuses_a_share_that_leaves_nothing():
    with pytest.raises(ValueError, match="leaves none to train on"):
        split(["a"], [{}], 0.6, 0)
    with pytest.raises(ValueError, match=r"in \[0, 1\)"):
        split(["a", "b"], [{}, {}], 1.0, 0)


def test_a_run_trains_without_its_held_out_prompts(tiny_config):
    path = benchmark_file("longtext")
    cfg = tiny_config(f"data.prompts={path}", "data.held_out_share=0.25", "data.held_out_seed=1",
                      "rewards=[{name: ocr}]")
    plan = check_run(cfg)
    (train, _), (held, _) = split(*load_prompts(str(path)), 0.25, 1)
    assert plan.prompts == train and len(train) == 120 and not set(held) & set(plan.prompts)
    assert plan.metadata[0]["text"] and len(plan.metadata) == 120
    one = path.parent.parent / "geneval" / "object_names.txt"  # 80 one-word prompts
    with pytest.raises(ConfigError, match="data.held_out_share"):
        check_run(tiny_config(f"data.prompts={one}", "data.held_out_share=0.999"))
