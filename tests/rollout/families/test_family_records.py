"""Each model family is one record: every family has each part, and the tables that name families are read from
the records. The fast path's packed weights and CUDA graphs are held by their owners, never on a module."""

from typing import get_args

import pytest
import torch

from omnigrpo.app import planner
from omnigrpo.app.sizing import model_size
from omnigrpo.bench.harness import bench_rollout
from omnigrpo.config.loader import ConfigError, load_config
from omnigrpo.config.schema import FamilyName, ModelConfig, TrainerConfig, WorldConfig
from omnigrpo.rollout.engine import PackedLayers
from omnigrpo.rollout.families import tiny
from omnigrpo.rollout.family import Family, Skeleton
from omnigrpo.rollout.graphs import GraphSet
from omnigrpo.rollout.hub import read_json
from omnigrpo.rollout.loader import (
    FAMILY_NAMES,
    CheckpointError,
    check_checkpoint,
    family_class,
    family_record,
    family_records,
    load_policy,
)
from omnigrpo.rollout.policy import GridPolicy
from omnigrpo.rollout.sampler import SamplingParams, sample_images


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    """A tiny checkpoint of every family, written by its record's builder through ``omnigrpo tiny``'s table."""
    root = tmp_path_factory.mktemp("registry")
    return {name: tiny.build(name, root / name) for name in FAMILY_NAMES}


def test_the_family_names_are_the_configs_and_each_module_holds_its_record():
    assert FAMILY_NAMES == get_args(FamilyName) == ("builtin", "janus", "emu3", "xomni")
    for record in family_records():
        assert isinstance(record, Family) and record.policy.family == record.name
        assert family_class(record.name) is record.policy
    with pytest.raises(ValueError, match="unknown model family 'dalle'; known: builtin, janus, emu3, xomni"):
        family_record("dalle")


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_every_family_has_each_part(name, tiny_dirs):
    """Hub layout, model type, tiny builder, sizing and the body: the tiny checkpoint holds the layout and passes
    the checks, and the memory plan's meta-device count equals the loaded model's parameters."""
    record, path = family_record(name), tiny_dirs[name]
    assert record.layout[0] == "config.json" and all((path / f).is_file() for f in record.layout)
    assert read_json(path)["model_type"] in record.model_types
    check_checkpoint(name, str(path))
    policy = load_policy(name, path)
    model = ModelConfig(family=name, path=str(path))
    with torch.device("meta"):
        skeleton = record.skeleton(model, WorldConfig())
    assert isinstance(skeleton, Skeleton) and skeleton.model.device == torch.device("meta")
    size = model_size(model, WorldConfig(), TrainerConfig())
    assert size.params == sum(p.numel() for p in policy.model.parameters())
    expected = len(policy.space.segment) if name != "builtin" else policy.space.tokens_per_image
    assert size.image_tokens == expected
    body = policy.lm().body
    assert body is policy.model.get_submodule(record.policy.view.body_path) and size.layers == len(body.layers)


def test_tiny_builders_are_the_records_and_the_decoder_stage(tmp_path):
    assert list(tiny.builders()) == [*FAMILY_NAMES, "decoder"]
    assert tiny.builders()["decoder"] is family_record("xomni").decoder.tiny
    with pytest.raises(ValueError, match="no tiny builder for family 'bogus'; known: builtin, .*, decoder"):
        tiny.build("bogus", tmp_path)


def test_the_memory_plan_reads_the_decoder_stage_from_the_record():
    assert planner.decoder_memory("xomni") == {"decoder": int(family_record("xomni").decoder.memory_gib * 2**30)}
    assert planner.decoder_memory("janus") == {}


def test_the_bench_names_the_families_with_a_baseline(tiny_config):
    cfg = tiny_config("model.family=xomni", "model.path=x/y", "decoder.path=x/z")
    with pytest.raises(ValueError, match=r"no HF generate baseline for family 'xomni' \(builtin, janus, emu3\)"):
        bench_rollout(cfg.rollout, cfg.model.family, cfg.world.name, "x/y", 1)


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_the_config_checks_agree_with_the_records(name):
    """The config layer cannot import the records; its per-family checks must still say what they say."""
    record, path = family_record(name), [] if name == "builtin" else ["model.path=x/y"]

    def accepted(*overrides: str) -> bool:
        try:
            load_config(None, [f"model.family={name}", *path, *overrides])
        except ConfigError:
            return False
        return True

    assert accepted("model.image_grid=[4, 4]") == issubclass(record.policy, GridPolicy)
    assert accepted("decoder.path=x/z") == (record.decoder is not None)


def test_a_local_checkpoint_missing_a_layout_file_is_refused_by_name(tiny_dirs, tmp_path):
    import shutil

    broken = shutil.copytree(tiny_dirs["builtin"], tmp_path / "builtin")
    (broken / "codebook.npy").unlink()
    with pytest.raises(CheckpointError, match="is no whole builtin checkpoint: it lacks codebook.npy"):
        check_checkpoint("builtin", str(broken))
    with pytest.raises(CheckpointError, match="is a 'janus' model"):  # another family's: named by its type first
        check_checkpoint("builtin", str(tiny_dirs["janus"]))


def test_views_of_a_policys_model_share_its_packed_layers_and_nothing_is_written_on_modules(tiny_dirs):
    policy = load_policy("janus", tiny_dirs["janus"])
    batch = policy.prompt_batch(["a red apple"])
    first = sample_images(policy.lm(), batch, SamplingParams(), torch.Generator().manual_seed(0))
    packed = policy.packed_layers.layers
    again = sample_images(policy.lm(), batch, SamplingParams(), torch.Generator().manual_seed(0))
    assert packed is not None and policy.packed_layers.layers is packed  # packed once, by the policy's views
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert policy.lm(policy.model).packed_layers is policy.packed_layers
    other = policy.lm(load_policy("janus", tiny_dirs["janus"]).model)
    assert other.packed_layers is not policy.packed_layers and other.packed_layers.layers is None
    assert not [k for m in policy.model.modules() for k in vars(m) if k.startswith("_omnigrpo")]


def test_packed_layers_hold_copies_until_invalidated(tiny_dirs):
    layers = load_policy("janus", tiny_dirs["janus"]).lm().body.layers
    cache, copies = PackedLayers(), [("held",)]
    cache.hold(copies)
    assert cache.of(layers) is copies
    cache.invalidate()
    fused = cache.of(layers)
    assert fused is not copies and fused[0][0].shape[0] == sum(m.out_features for m in (
        layers[0].self_attn.q_proj, layers[0].self_attn.k_proj, layers[0].self_attn.v_proj))


def test_a_graph_set_serves_one_module_and_clears(tiny_dirs):
    """On the CPU capture fails (recorded, eager decoding); a set refuses another module until cleared."""
    a, b = (load_policy("janus", tiny_dirs["janus"]) for _ in range(2))
    graphs, params = GraphSet(), SamplingParams()
    assert graphs.decoder(a.lm(), params, 1, 1, 80, None) is None and len(graphs.failures) == 1
    with pytest.raises(ValueError, match="serves one module"):
        graphs.decoder(b.lm(), params, 1, 1, 80, None)
    graphs.clear()
    assert not graphs.failures and graphs.module is None
    assert graphs.decoder(b.lm(), params, 1, 1, 80, None) is None and graphs.module is b.model
