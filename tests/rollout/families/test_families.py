"""Every model family through the one policy interface: tiny random checkpoints of the real classes,
saved with ``save_pretrained`` and loaded back through ``model.path``."""

import json

import pytest
import torch
from safetensors.torch import save_file

from omnigrpo.config.loader import ConfigError, load_config
from omnigrpo.rollout.families import tiny, xomni
from omnigrpo.rollout.families.xomni import XOmniForCausalLM
from omnigrpo.rollout.loader import FAMILY_NAMES as ALL_FAMILIES
from omnigrpo.rollout.loader import CheckpointError, check_checkpoint, family_class, load_policy
from omnigrpo.rollout.sampler import SamplingParams, sample_images, segment_embeds, sequence_logprobs

FAMILY_NAMES = ["janus", "emu3", "xomni"]
PROMPTS = ["a red circle at the top left", "a cat", "a photo of a dog and a blue square in the middle"]


@pytest.fixture(scope="session")
def family_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    return {family: tiny.build(family, root / family) for family in FAMILY_NAMES}


@pytest.mark.parametrize("family", FAMILY_NAMES)
@pytest.mark.parametrize(
    "params",
    [SamplingParams(), SamplingParams(cfg_scale=3.0), SamplingParams(cfg_scale=2.0, temperature=0.8, top_k=20,
                                                                     top_p=0.9, min_p=0.03)],
    ids=["plain", "cfg", "cfg+filters"],
)
def test_rollout_logprobs_equal_learner_recomputation(family_dirs, family, params):
    """The fast static-cache sampler and the model's own HF forward agree to 1e-5 in fp32."""
    policy = load_policy(family, family_dirs[family])
    batch = policy.prompt_batch(PROMPTS)
    assert (batch.mask == 0).any()  # left padding exercised
    codes, rollout_lp = sample_images(policy.lm(), batch, params, torch.Generator().manual_seed(1))
    assert codes.shape == (3, policy.space.tokens_per_image)
    assert codes.min() >= 0 and codes.max() < policy.space.num_codes
    learner_lp, ent = sequence_logprobs(policy.lm(), batch, codes, params)
    assert (rollout_lp - learner_lp).abs().max().item() < 1e-5
    assert learner_lp.requires_grad and (ent >= 0).all()


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_decode_size_and_save_load_round_trip(family_dirs, family, tmp_path):
    policy = load_policy(family, family_dirs[family])
    codes = torch.randint(0, policy.space.num_codes, (2, policy.space.tokens_per_image))
    images = policy.decode(codes)
    assert images.dtype.name == "uint8"
    assert images.shape == (2, *policy.image_shape, 3) == (2, *family_class(family).pixels(family_dirs[family]), 3)
    policy.save_pretrained(tmp_path)
    loaded = load_policy(family, tmp_path)
    assert loaded.space == policy.space
    for (name, a), b in zip(loaded.model.state_dict().items(), policy.model.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_guidance_changes_the_scored_distribution(family_dirs):
    policy = load_policy("janus", family_dirs["janus"])
    batch = policy.prompt_batch(PROMPTS[:2])
    codes, _ = sample_images(policy.lm(), batch, SamplingParams(), torch.Generator().manual_seed(0))
    plain, _ = sequence_logprobs(policy.lm(), batch, codes, SamplingParams())
    guided, _ = sequence_logprobs(policy.lm(), batch, codes, SamplingParams(cfg_scale=4.0))
    assert (plain - guided).abs().max() > 1e-3


def test_janus_unconditional_prompt_keeps_only_bos_and_image_start(family_dirs):
    policy = load_policy("janus", family_dirs["janus"])
    batch = policy.prompt_batch(["a cat"])
    tokens = policy.tokenizer.convert_ids_to_tokens(batch.uncond_ids[0].tolist())
    kept = [t for t in tokens if t != policy.tokenizer.pad_token]
    assert kept == [policy.tokenizer.bos_token, "<begin_of_image>"]
    assert policy.tokenizer.convert_ids_to_tokens(batch.ids[0].tolist())[-1] == "<begin_of_image>"


def test_emu3_feeds_an_end_of_line_after_every_row_and_never_samples_it(family_dirs):
    policy = load_policy("emu3", family_dirs["emu3"])
    lm, space = policy.lm(), policy.space
    assert space.eol_id == policy.tokenizer.convert_tokens_to_ids("<|extra_200|>")
    codes = torch.randint(0, space.num_codes, (1, space.tokens_per_image))
    fed = segment_embeds(lm, codes)[0]
    eol = lm.embed_text(torch.tensor([space.eol_id]))[0]
    assert fed.shape[0] == space.rows * (space.cols + 1)
    for r in range(space.rows):
        assert torch.equal(fed[r * (space.cols + 1) + space.cols], eol)
    ids = policy.prompt_batch(["a cat"]).ids[0].tolist()
    assert policy.tokenizer.convert_ids_to_tokens(ids)[-5:] == ["<|image start|>", "8", "*", "8", "<|image token|>"]


def test_xomni_prompt_ends_with_its_image_prefix_and_cfg_drops_the_text(family_dirs):
    policy = load_policy("xomni", family_dirs["xomni"])
    batch = policy.prompt_batch(["a cat"])
    text = policy.tokenizer.decode(batch.ids[0][batch.mask[0].bool()])
    uncond = policy.tokenizer.decode(batch.uncond_ids[0][batch.uncond_mask[0].bool()])
    assert text == "a cat<SOM>8 8<IMAGE>" and uncond == "<SOM>8 8<IMAGE>"


def test_xomni_loads_a_state_dict_in_the_published_naming(family_dirs, tmp_path):
    """Names and shapes as X-Omni's public model code defines them (vision blocks are entries of
    ``model.layers``; no ``model.embed_tokens`` / ``model.norm``), written by hand, loaded strictly."""
    cfg = json.loads((family_dirs["xomni"] / "config.json").read_text())
    hidden, inter, vocab, mm = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"], cfg["mm_vocab_size"]
    head_dim = hidden // cfg["num_attention_heads"]
    q, kv = cfg["num_attention_heads"] * head_dim, cfg["num_key_value_heads"] * head_dim
    published = {"model.lm_embed_tokens.weight": (vocab, hidden), "model.mm_embed_tokens.weight": (mm, hidden),
                 "model.lm_norm.weight": (hidden,), "model.mm_norm.weight": (hidden,),
                 "lm_head.weight": (vocab, hidden), "mm_head.weight": (mm, hidden)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        published |= {p + "self_attn.q_proj.weight": (q, hidden), p + "self_attn.q_proj.bias": (q,),
                      p + "self_attn.k_proj.weight": (kv, hidden), p + "self_attn.k_proj.bias": (kv,),
                      p + "self_attn.v_proj.weight": (kv, hidden), p + "self_attn.v_proj.bias": (kv,),
                      p + "self_attn.o_proj.weight": (hidden, q), p + "mlp.gate_proj.weight": (inter, hidden),
                      p + "mlp.up_proj.weight": (inter, hidden), p + "mlp.down_proj.weight": (hidden, inter),
                      p + "input_layernorm.weight": (hidden,), p + "post_attention_layernorm.weight": (hidden,)}
    gen = torch.Generator().manual_seed(0)
    state = {k: torch.randn(shape, generator=gen) for k, shape in published.items()}
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "architectures": ["XOmniForCausalLM"],
                                                      "auto_map": {"AutoModelForCausalLM": "modeling_xomni.X"}}))
    model, info = XOmniForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert torch.equal(model.state_dict()["model.layers.0.self_attn.q_proj.bias"],
                       state["model.layers.0.self_attn.q_proj.bias"])
    assert model.model.image_only == [True, False, False, True]  # 1 vision, 2 LM, 1 vision block


@pytest.mark.parametrize("params", [SamplingParams(), SamplingParams(cfg_scale=3.0, min_p=0.03)], ids=["plain", "cfg"])
def test_xomni_with_its_special_tokens_in_the_mm_rows(tmp_path, params):
    """If ``<SOM>``/``<IMAGE>`` sit above the text vocabulary (as ``<MM-Token-k>`` do), they embed from the mm
    table and their positions are image positions (vision blocks, mm_norm): rollout and learner still agree."""
    xomni.tiny_checkpoint(tmp_path, specials_in_mm=True)
    policy = load_policy("xomni", tmp_path)
    vocab = policy.model.config.vocab_size
    assert policy.tokenizer.convert_tokens_to_ids("<MM-Token-0>") == vocab
    batch = policy.prompt_batch(PROMPTS)
    marked = policy.lm().prompt_image(batch.ids)
    assert marked.sum(1).tolist() == [2, 2, 2]  # <SOM> and <IMAGE> in every prompt
    codes, rollout_lp = sample_images(policy.lm(), batch, params, torch.Generator().manual_seed(0))
    learner_lp, _ = sequence_logprobs(policy.lm(), batch, codes, params)
    assert (rollout_lp - learner_lp).abs().max() < 1e-5


def test_xomni_vision_blocks_change_only_image_positions(family_dirs):
    policy = load_policy("xomni", family_dirs["xomni"])
    body = policy.model.model
    ids = torch.tensor([[5, 6, 7, 8]])
    embeds, mask = body.lm_embed_tokens(ids), torch.ones(1, 4, dtype=torch.long)
    positions = torch.arange(4)[None]
    text_only = body(embeds, torch.zeros(1, 4, dtype=torch.bool), mask, positions)
    with torch.no_grad():  # a vision block that would change everything: text positions must not see it
        body.layers[0].mlp.down_proj.weight.mul_(50.0)
    again = body(embeds, torch.zeros(1, 4, dtype=torch.bool), mask, positions)
    image = body(embeds, torch.tensor([[False, False, True, True]]), mask, positions)
    torch.testing.assert_close(again, text_only)
    assert (image[0, 2:] - text_only[0, 2:]).abs().max() > 1e-3


def test_unknown_family_missing_path_and_wrong_vocabulary_fail_before_anything_starts(family_dirs, tmp_path):
    with pytest.raises(ConfigError, match="model.family"):
        load_config(None, ["model.family=chameleon"])
    with pytest.raises(ConfigError, match="model.path: family 'janus' needs a checkpoint"):
        load_config(None, ["model.family=janus"])
    with pytest.raises(ConfigError, match="model.image_grid"):
        load_config(None, ["model.family=janus", "model.path=x/y", "model.image_grid=[4, 4]"])
    with pytest.raises(CheckpointError, match="does not exist"):
        check_checkpoint("janus", str(tmp_path / "nowhere"))
    with pytest.raises(CheckpointError, match="model.image_codes: is 16384, but the checkpoint .* has an image "
                                              "vocabulary of 64 codes"):
        check_checkpoint("emu3", str(family_dirs["emu3"]), 16384)
    check_checkpoint("xomni", str(family_dirs["xomni"]), 64)
    with pytest.MonkeyPatch.context() as mp:  # a hub id offline, with no cached copy: refused up front
        mp.setenv("HF_HUB_OFFLINE", "1")
        with pytest.raises(CheckpointError, match="HF_HUB_OFFLINE"):
            check_checkpoint("janus", "deepseek-community/Janus-Pro-1B")
    assert set(ALL_FAMILIES) == {"builtin", *FAMILY_NAMES}


def test_diffusion_decoder_takes_flux_dev_settings(tmp_path):
    """FLUX.1-dev's scheduler needs ``mu`` (dynamic shifting), its transformer a guidance value."""
    from omnigrpo.rollout.families.diffusion import DiffusionDecoder

    decoder = DiffusionDecoder(str(tiny.diffusion_decoder(tmp_path / "dev", flux_dev=True)), steps=2, guidance=2.0)
    decoder.setup()
    assert decoder.transformer.config.guidance_embeds and decoder.scheduler.config.use_dynamic_shifting
    assert decoder.decode(torch.zeros(1, 64, dtype=torch.long), (8, 8)).shape == (1, 32, 32, 3)


def test_diffusion_decoder_paints_codes_and_depends_on_them(tmp_path):
    from omnigrpo.rollout.families.diffusion import DiffusionDecoder

    path = tiny.diffusion_decoder(tmp_path / "decoder")
    decoder = DiffusionDecoder(str(path), steps=3, guidance=2.0, seed=0)
    decoder.setup()
    with torch.no_grad():  # X-Omni zero-initialises it; a trained one is not zero
        decoder.transformer.siglip_embed.weight.normal_()
    codes = torch.randint(0, 64, (2, 64), generator=torch.Generator().manual_seed(0))
    images = decoder.decode(codes, (8, 8))
    assert images.shape == (2, 32, 32, 3) == (2, *DiffusionDecoder.pixels(path, (8, 8)), 3)
    decoder.generator.manual_seed(0)
    same_noise_other_codes = decoder.decode((codes + 1) % 64, (8, 8))
    decoder.generator.manual_seed(0)
    again = decoder.decode(codes, (8, 8))
    assert (again == images).all()  # deterministic given the seed: the codes are what differs below
    assert abs(images.astype(int) - same_noise_other_codes.astype(int)).mean() > 1.0


def test_rollout_worker_samples_in_pieces_on_one_stream(family_dirs):
    """``rollout.sample_batch`` bounds the KV cache: pieces of 3 images, same log-prob parity."""
    from omnigrpo.rollout.worker import RolloutWorker

    params = SamplingParams(cfg_scale=2.0)
    worker = RolloutWorker(str(family_dirs["emu3"]), params, seed=0, threads=2, family="emu3", sample_batch=3)
    worker.setup()
    batch = worker.generate(PROMPTS[:2], [{}, {}], group_size=4)
    assert batch.codes.shape == (8, 64) and batch.images.shape == (8, 32, 32, 3) and batch.grid == (8, 8)
    learner_lp, _ = sequence_logprobs(worker.policy.lm(), batch.prompt_batch, batch.codes, params)
    assert (batch.logprobs - learner_lp).abs().max() < 1e-5
    assert len({tuple(c.tolist()) for c in batch.codes}) == 8  # pieces do not repeat the same draws


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_a_prompt_longer_than_the_models_positions_is_cut_to_fit_with_a_warning(family_dirs, family, caplog):
    from omnigrpo.rollout.worker import RolloutWorker

    worker = RolloutWorker(str(family_dirs[family]), SamplingParams(cfg_scale=2.0), seed=0, threads=2, family=family)
    worker.setup()
    limit, segment = worker.policy.positions(), len(worker.policy.space.segment)
    long = " ".join(["a red circle"] * 2000)  # thousands of tokens against a table of ~1000 positions
    with caplog.at_level("WARNING", logger="omnigrpo.rollout.policy"):
        batch = worker.generate([PROMPTS[1], long], [{}, {}], group_size=1)
    assert batch.prompt_batch.ids.shape[1] + segment <= limit
    assert batch.prompts[1] == long  # the rewards judge the prompt as written
    assert int(batch.prompt_batch.mask[1].sum()) > limit - segment - 10  # cut to fit, not to nothing
    assert [r.message for r in caplog.records if "cut to its first" in r.message][0].startswith(
        f"a prompt of {len(long)} characters passes the {family} model's {limit} positions")
