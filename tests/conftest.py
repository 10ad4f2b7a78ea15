"""Shared fixtures: a tiny config of the real classes, its SFT checkpoint, and one local Ray cluster per session.

The tiny SFT checkpoint is trained once per machine into pytest's cache directory, keyed by its config like any
SFT checkpoint (and locked like one: workers that need it at once train it once).

Runs join the session's cluster (``ray_cluster``) the way a run joins a user's cluster: the driver then frees
what it reserved instead of shutting Ray down, and each test checks that nothing was left behind. Only the
jobs, two-host and multi-node tests start clusters of their own. ``pytest -m "not cluster"`` skips every test
that needs one (a few-minute inner loop). ``make test`` runs the suite on one pytest worker per core
(pytest-xdist, ``--dist loadgroup``): each worker has its own session cluster, and the tests that read one
shared run are sent to one worker.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from omnigrpo.cluster.environment import prepare_local_ray_env
from omnigrpo.config.runtime import quiet_thread_waits

quiet_thread_waits()  # as the CLI does, before torch is imported
import torch  # noqa: E402
import yaml  # noqa: E402

prepare_local_ray_env("")  # as the CLI does, before anything imports Ray
os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "omnigrpo" / "torch_extensions"))

from omnigrpo.config.loader import load_config  # noqa: E402
from omnigrpo.config.schema import Config  # noqa: E402

TINY = [
    "model.hidden_size=32", "model.num_layers=2", "model.num_heads=2", "model.num_kv_heads=1",
    "model.intermediate_size=64", "world.codebook_size=64", "sft.steps=40", "sft.batch_size=32",
    "sft.kmeans_images=128", "rollout.prompts_per_step=4", "rollout.group_size=4",
    "trainer.micro_batch_size=8", "eval.samples_per_prompt=2", "tracking.image_every=1", "tracking.images=4",
]


def layered(*groups) -> list[str]:
    """Override lists as one command line takes them, each key once: a later group's value replaces an earlier
    one's (the command line refuses a key typed twice with different values)."""
    merged: dict[str, str] = {}
    for item in (item for group in groups for item in group):
        merged[item.partition("=")[0].strip()] = item
    return list(merged.values())


SHARED = {"reference_run": "reference", "feature_run": "feature", "two_ranks_run": "hybrid", "lag_run": "lag",
          "hub_runs": "hub"}
"""Runs several tests read (fixture -> group; the session runs here, module runs in their test files): under
``pytest -n`` (``make test``) their readers share one worker, so each run is made once."""
HOSTS = ("tests/cluster/test_two_hosts.py", "tests/cluster/test_multinode.py")
"""Tests that build several hosts or nodes on this machine: one at a time."""


@pytest.hookimpl(tryfirst=True)  # before xdist reads the groups off the marks
def pytest_collection_modifyitems(items) -> None:
    for item in items:  # fixturenames holds every fixture a test needs, directly or through others
        names = getattr(item, "fixturenames", ())
        if "_session_ray" in names:
            item.add_marker(pytest.mark.cluster)
        groups = [group for fixture, group in SHARED.items() if fixture in names]
        if item.nodeid.startswith(HOSTS):
            groups.append("hosts")
        if groups:
            item.add_marker(pytest.mark.xdist_group(groups[0]))


@pytest.fixture(scope="session")
def cache_dir(request, tmp_path_factory) -> Path:
    """``run.cache_dir`` of every tiny config: under pytest's cache, so the tiny SFT checkpoint (keyed by its
    config) is trained once per machine, not once per session (``pytest --cache-clear`` starts afresh; with
    ``-p no:cacheprovider``, once per session)."""
    cache = getattr(request.config, "cache", None)
    return Path(cache.mkdir("omnigrpo")) if cache else tmp_path_factory.mktemp("cache")


@pytest.fixture
def tiny_config(cache_dir, tmp_path):
    """``tiny_config(*overrides, path=None)`` -> a validated Config of a tiny model writing under ``tmp_path``
    (``path``: a YAML file to start from)."""

    def make(*overrides: str, path: Path | None = None) -> Config:
        return load_config(path, [*TINY, f"run.cache_dir={cache_dir}", f"run.dir={tmp_path / 'run'}", *overrides])

    return make


@pytest.fixture(scope="session")
def sft_path(cache_dir) -> Path:
    """The tiny config's SFT checkpoint (trained once per session, then reused from the cache)."""
    from omnigrpo.trainers.sft import sft_checkpoint

    cfg = load_config(None, [*TINY, f"run.cache_dir={cache_dir}"])
    return sft_checkpoint(cfg.sft, cfg.model, cfg.world, cfg.run, threads=2)


REFERENCE = ("trainer.lr=3e-3", "eval.every=0", "tracking.image_every=0", "rollout.top_k=30", "trainer.steps=4",
             "trainer.ref_refresh_every=2")
"""The reference run's overrides: a run that trains visibly in 4 steps, its KL reference refreshed after steps 2
and 4 (so the runs that must match it, resumed, hybrid or on two ranks, refresh alike)."""


@pytest.fixture(scope="session")
def reference_run(_session_ray, sft_path, cache_dir, tmp_path_factory) -> tuple[Config, dict]:
    """``(config, summary)`` of one uninterrupted 4-step run of :data:`REFERENCE` (colocated, one learner, the
    broadcast sync): what resumed, stopped-and-resumed, hybrid and two-rank runs of the same seed must end at."""
    from omnigrpo.app.driver import train

    run_dir = tmp_path_factory.mktemp("reference") / "run"
    cfg = load_config(None, [*TINY, f"run.cache_dir={cache_dir}", f"run.dir={run_dir}", *REFERENCE])
    summary = train(cfg)
    assert summary["rollout_versions"] == [4] and not leftovers()
    return cfg, summary


def policy_weights(path) -> dict[str, torch.Tensor]:
    """The built-in policy's weights saved at ``path`` (a checkpoint or SFT directory)."""
    from omnigrpo.rollout.families.builtin import WorldPolicy

    return WorldPolicy.from_pretrained(path).model.state_dict()


def metric_values(cfg: Config, run_id: str, key: str) -> list[float]:
    """The values a run of ``cfg`` logged for ``key``, in step order (read back from its MLflow store)."""
    from mlflow.tracking import MlflowClient

    from omnigrpo.app.tracking import history, store_uri

    return [m.value for m in history(MlflowClient(store_uri(cfg.tracking, cfg.run.dir)), run_id, key)]


def refused(main, argv: list[str], capsys, *needles: str) -> str:
    """Run the CLI's ``main(argv)`` and check it refused: exit status 2, every stderr line an ``omnigrpo:`` line
    (no traceback), each of ``needles`` in the message; returns stderr."""
    try:
        code = main(argv)
    except SystemExit as ended:  # argparse's usage errors
        code = ended.code
    err = capsys.readouterr().err
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines and all(line.startswith("omnigrpo: ") for line in lines), err
    for needle in needles:
        assert needle in err, (needle, err)
    return err


ROOT = Path(__file__).parents[1]
PLUGINS = ROOT / "tests" / "plugins"
EXAMPLES = ROOT / "examples" / "rewards"


def leftovers() -> list[str]:
    """What runs left on the connected cluster: placement groups not removed and omnigrpo actors still named
    (empty when Ray is not running)."""
    import ray

    if not ray.is_initialized():
        return []
    groups = [f"placement group {g['placement_group_id']} ({g['state']})"
              for g in ray.util.placement_group_table().values() if g["state"] != "REMOVED"]
    names = [a["name"] if isinstance(a, dict) else a for a in ray.util.list_named_actors()]
    return groups + [f"actor {n}" for n in names if n.startswith("omnigrpo-")]


def _connect() -> None:
    """Start the session's cluster as a run starts its own (``actors.connect``), unless one is connected; the
    raylet, and so every worker, inherits this environment: the test plugins importable, the driver's pid."""
    import ray

    from omnigrpo.cluster import actors

    if ray.is_initialized():
        return
    saved = {k: os.environ.get(k) for k in ("PYTHONPATH", "OMNIGRPO_TEST_IN_RAY", "OMNIGRPO_TEST_DRIVER_PID")}
    os.environ.update(PYTHONPATH=os.pathsep.join(filter(None, [str(PLUGINS), str(EXAMPLES), saved["PYTHONPATH"]])),
                      OMNIGRPO_TEST_IN_RAY="1", OMNIGRPO_TEST_DRIVER_PID=str(os.getpid()))
    try:
        actors.connect(load_config(None, TINY).cluster)
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key)
            else:
                os.environ[key] = value


@pytest.fixture(scope="session")
def _session_ray():
    """The session's cluster; the test plugins are importable on this driver too (rewards resolve here first)."""
    sys.path[:0] = [str(PLUGINS), str(EXAMPLES)]
    _connect()
    yield
    import ray

    ray.shutdown()


@pytest.fixture
def ray_cluster(_session_ray):
    """The session's local Ray cluster (reconnected if a test ended it). After the test, nothing the test's runs
    reserved may be left on it: leftovers are cleared, then reported as an error of that test."""
    _connect()
    yield
    left = leftovers()
    if left:
        _clear()
    assert not left, f"the test's runs left on the cluster: {left}"


def _clear() -> None:
    import ray
    from ray.util.placement_group import PlacementGroup, remove_placement_group

    for name in (a["name"] if isinstance(a, dict) else a for a in ray.util.list_named_actors()):
        ray.kill(ray.get_actor(name))
    for key, group in ray.util.placement_group_table().items():
        if group["state"] != "REMOVED":
            remove_placement_group(PlacementGroup(ray.PlacementGroupID(bytes.fromhex(key))))


@pytest.fixture
def plugins(monkeypatch) -> Path:
    """``tests/plugins`` and ``examples/rewards`` on the import path of this process (the session cluster's
    workers have them too, and so does a run's own cluster started by a subprocess of this test), so tests name
    the reward modules there as ``module:attr``."""
    for path in (PLUGINS, EXAMPLES):
        monkeypatch.syspath_prepend(str(path))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(PLUGINS), str(EXAMPLES),
                                                                    os.environ.get("PYTHONPATH")])))
    return PLUGINS


TINY_CLIP = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "head_width": 32, "patch_size": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory):
    """A tiny random CLIP written the way open_clip publishes models: config JSON + safetensors."""
    import open_clip
    from safetensors.torch import save_file

    directory = tmp_path_factory.mktemp("tiny_clip")
    (directory / "open_clip_config.json").write_text(json.dumps({
        "model_cfg": TINY_CLIP,
        "preprocess_cfg": {"mean": [0.48145466, 0.4578275, 0.40821073], "std": [0.26862954, 0.26130258, 0.27577711]},
    }))
    torch.manual_seed(0)
    model = open_clip.create_model(f"local-dir:{directory}", load_weights=False)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, directory / "open_clip_model.safetensors")
    return directory


PLUGIN_CONFIG = ROOT / "configs" / "shapes_plugin.yaml"
EXTRA_REWARDS = [
    {"name": "flaky_judge:first_is_nan", "weight": 0.5},  # fails on the first sample of every call
    {"name": "ocr", "weight": 0.5, "required": False, "kwargs": {"detect": False}},
]
PROMPTS = ('{"prompt": "a red circle at the top left"}\n'
           '{"prompt": "a blue square at the bottom right", "text": "BLUE"}\n'
           '{"prompt": "a yellow triangle at the top right"}\n'
           '{"prompt": "a green circle at the bottom left", "text": "GO"}\n')


@pytest.fixture(scope="session")
def feature_run(_session_ray, sft_path, cache_dir, tiny_clip_dir, tmp_path_factory) -> tuple[Config, dict]:
    """``(config, summary)`` of 3 steps of ``configs/shapes_plugin.yaml`` as shipped (the README's plugin
    example, from ``examples/rewards``) with more rewards added: a flaky plugin, OCR and CLIP; two reward
    workers, two rollout chunks, prompts with text, an evaluation every 2 steps and sample images."""
    from omnigrpo.app.driver import train

    root = tmp_path_factory.mktemp("feature")
    (root / "prompts.jsonl").write_text(PROMPTS)
    clip = {"name": "clip", "weight": 0.3, "kwargs": {"model": f"local-dir:{tiny_clip_dir}", "pretrained": None}}
    shipped = yaml.safe_load(PLUGIN_CONFIG.read_text())["rewards"]
    rewards = yaml.safe_dump([*shipped, *EXTRA_REWARDS, clip], default_flow_style=True, width=10**6).strip()
    cfg = load_config(PLUGIN_CONFIG, [
        *TINY, f"run.cache_dir={cache_dir}", f"run.dir={root / 'run'}", "trainer.steps=3", "eval.every=2",
        "trainer.lr=1e-3", "tracking.image_every=2", f"data.prompts={root / 'prompts.jsonl'}",
        "cluster.reward_workers=2", "rollout.chunks=2", f"rewards={rewards}"])
    return cfg, train(cfg)


@pytest.fixture(scope="session")
def tiny_detector_dir(tmp_path_factory):
    """A tiny random Mask2Former of the real class (COCO's 80 classes, GenEval's names) with its image processor."""
    import transformers as tf

    from omnigrpo.rewards.judges.geneval_rules import COCO_CLASSES

    directory = tmp_path_factory.mktemp("tiny_detector")
    backbone = tf.SwinConfig(image_size=64, patch_size=4, embed_dim=32, depths=[1, 1, 1, 1], num_heads=[1, 1, 1, 1],
                             window_size=4, out_features=["stage1", "stage2", "stage3", "stage4"])
    config = tf.Mask2FormerConfig(backbone_config=backbone, feature_size=32, mask_feature_size=32, hidden_dim=32,
                                  encoder_feedforward_dim=32, dim_feedforward=32, encoder_layers=1, decoder_layers=2,
                                  num_attention_heads=2, num_queries=8, id2label=dict(enumerate(COCO_CLASSES)),
                                  use_pretrained_backbone=False)
    torch.manual_seed(0)
    tf.Mask2FormerForUniversalSegmentation(config).save_pretrained(directory)
    tf.Mask2FormerImageProcessor(size={"shortest_edge": 64, "longest_edge": 128}).save_pretrained(directory)
    return directory


VLM_WORDS = ["yes", "no", "Yes", "No", "Final", "Score:", "1", "2", "3", "4", "5", "Does", "this", "image", "show",
         "Answer", "or", "a", "red", "circle", "at", "the", "top", "left", "blue", "square", "bottom", "right"]
VLM_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
            "<|video_pad|>"]
VLM_TEMPLATE = ("{% for m in messages %}<|im_start|> {{ m['role'] }} {% for c in m['content'] %}"
            "{% if c['type'] == 'image' %}<|vision_start|> <|image_pad|> <|vision_end|> {% else %}{{ c['text'] }} "
            "{% endif %}{% endfor %}<|im_end|> {% endfor %}"
            "{% if add_generation_prompt %}<|im_start|> assistant {% endif %}")


@pytest.fixture(scope="session")
def tiny_vlm_dir(tmp_path_factory):
    """A tiny random Qwen2-VL saved with save_pretrained, its processor built offline."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import (
        PreTrainedTokenizerFast,
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
        Qwen2VLImageProcessor,
        Qwen2VLProcessor,
        Qwen2VLVideoProcessor,
    )

    vocab = {w: i for i, w in enumerate(VLM_SPECIALS + VLM_WORDS + ["<unk>"])}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.decoder = decoders.WordPiece()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                        unk_token="<unk>", additional_special_tokens=VLM_SPECIALS)
    processor = Qwen2VLProcessor(image_processor=Qwen2VLImageProcessor(min_pixels=28 * 28 * 4, max_pixels=28 * 28 * 16),
                                 tokenizer=tokenizer, video_processor=Qwen2VLVideoProcessor(),
                                 chat_template=VLM_TEMPLATE)
    config = Qwen2VLConfig(
        text_config={"vocab_size": len(vocab), "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                     "num_attention_heads": 2, "num_key_value_heads": 1, "bos_token_id": vocab["<|im_start|>"],
                     "eos_token_id": vocab["<|im_end|>"],
                     "rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3]}},
        vision_config={"depth": 2, "embed_dim": 32, "hidden_size": 32, "num_heads": 2, "mlp_ratio": 2,
                       "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2, "in_chans": 3},
        image_token_id=vocab["<|image_pad|>"], video_token_id=vocab["<|video_pad|>"],
        vision_start_token_id=vocab["<|vision_start|>"], vision_end_token_id=vocab["<|vision_end|>"],
        bos_token_id=vocab["<|im_start|>"], eos_token_id=vocab["<|im_end|>"],
    )
    torch.manual_seed(0)
    directory = tmp_path_factory.mktemp("tiny_qwen2vl")
    Qwen2VLForConditionalGeneration(config).save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory
