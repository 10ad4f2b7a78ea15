"""On a CUDA GPU: the sampler, every family's rollout worker, the diffusion decoder, the DeepSpeed learner and the
weight broadcast run on the device and keep their CPU contracts (log-prob parity, exact weight sync, learning).

Marked ``gpu``; skipped without a CUDA device. ``omnigrpo/bench/gpu_check.sh`` runs them on one, with the GPU
benchmark. ``OMNIGRPO_TEST_DEVICE=cpu`` runs them on the CPU instead, to check the tests themselves.
Measured gaps are recorded as junit properties (``--junitxml``)."""

from __future__ import annotations

import multiprocessing as mp
import os
import time
from functools import partial

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from omnigrpo.rewards.worker import RewardWorker
from omnigrpo.rollout.families import tiny
from omnigrpo.rollout.policy import ImageSpace, PromptBatch, TextVocabLM
from omnigrpo.rollout.sampler import SamplingParams, sample_images, sequence_logprobs
from omnigrpo.rollout.worker import RolloutWorker
from omnigrpo.sync.broadcast import WeightBroadcast
from omnigrpo.trainers.batch import TrainBatch
from omnigrpo.trainers.grpo import advantages
from omnigrpo.trainers.learner import Learner
from omnigrpo.trainers.tally import merge_ranks
from omnigrpo.worlds import shapes
from omnigrpo.worlds.world import prompts_of

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def device() -> torch.device:
    forced = os.environ.get("OMNIGRPO_TEST_DEVICE")
    if forced:
        return torch.device(forced)
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU (omnigrpo/bench/gpu_check.sh runs these on one)")
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 parity is checked at fp32 precision
    return torch.device("cuda")


def _llama(device: torch.device, dtype: torch.dtype) -> tuple[torch.nn.Module, ImageSpace]:
    """A random 4-layer Llama with 1024 text ids and 1024 image codes (a 16 x 16 grid) after them."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=2048, hidden_size=256, intermediate_size=704, num_hidden_layers=4,
                         num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=512, pad_token_id=0)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype).to(device).eval()
    return model, ImageSpace(num_codes=1024, rows=16, cols=16, offset=1024)


def _prompts(batch: int, device: torch.device) -> PromptBatch:
    """``[B, 12]`` prompts of uneven length (left padding), uncond = the last id alone."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 1023, (batch, 12), generator=g)
    mask = torch.ones_like(ids)
    for i in range(batch):
        ids[i, : i % 4], mask[i, : i % 4] = 0, 0
    uncond = torch.zeros_like(ids)
    uncond[:, -1] = ids[:, -1]
    return PromptBatch(ids.to(device), uncond.to(device), mask.to(device), pad_id=0)


@pytest.mark.parametrize(("dtype", "tolerance"), [(torch.float32, 1e-3), (torch.bfloat16, 0.25)])
def test_sampled_log_probs_match_the_teacher_forced_pass(device, dtype, tolerance, record_property):
    """The static-KV-cache decode and the learner's one-pass forward score the same codes alike (bf16: within
    the kernels' rounding), and a seed replays the same codes."""
    model, space = _llama(device, dtype)
    lm, prompts = TextVocabLM(model, space), _prompts(8, device)
    params = SamplingParams(temperature=1.0, top_k=200, cfg_scale=3.0)
    codes, sampled = sample_images(lm, prompts, params, torch.Generator(device).manual_seed(7))
    again, _ = sample_images(lm, prompts, params, torch.Generator(device).manual_seed(7))
    with torch.no_grad():
        scored, _ = sequence_logprobs(lm, prompts, codes, params)
    assert codes.device.type == device.type and codes.shape == (8, 256)
    assert int(codes.min()) >= 0 and int(codes.max()) < space.num_codes
    assert torch.equal(codes, again)
    gap = (sampled.float() - scored.float()).abs()
    record_property(f"logprob_gap_mean_{str(dtype)[6:]}", float(gap.mean()))
    record_property(f"logprob_gap_max_{str(dtype)[6:]}", float(gap.max()))
    assert torch.isfinite(sampled).all() and float(gap.mean()) < tolerance, float(gap.mean())


@pytest.mark.parametrize("family", ["janus", "emu3", "xomni"])
def test_each_family_samples_on_the_device_in_bfloat16(device, family, tmp_path):
    path = tiny.build(family, tmp_path / family)
    worker = RolloutWorker(str(path), SamplingParams(cfg_scale=3.0, top_k=20), seed=0, family=family,
                           dtype="bfloat16")
    worker.setup()
    assert worker.device.type == device.type
    assert next(worker.policy.model.parameters()).device.type == device.type
    batch = worker.generate(["a red apple", 'a sign that says "open"'], [{}, {}], 2)
    space = worker.policy.space
    assert batch.codes.shape == (4, space.tokens_per_image)
    assert int(batch.codes.min()) >= 0 and int(batch.codes.max()) < space.num_codes
    assert torch.isfinite(batch.logprobs).all() and float(batch.logprobs.max()) <= 0.0
    assert batch.images.dtype == np.uint8 and batch.images.shape[0] == 4 and batch.images.shape[-1] == 3


def test_the_diffusion_decoder_paints_codes_on_the_device(device, tmp_path):
    from omnigrpo.rollout.families.diffusion import DiffusionDecoder

    decoder = DiffusionDecoder(str(tiny.diffusion_decoder(tmp_path / "decoder")), steps=2)
    decoder.setup()
    assert decoder.device.type == device.type
    zeros, other = torch.zeros(1, 64, dtype=torch.long), torch.full((1, 64), 9, dtype=torch.long)
    a, b = decoder.decode(zeros, (8, 8)), decoder.decode(other, (8, 8))
    assert a.shape == (1, 32, 32, 3) and a.dtype == np.uint8
    assert not np.array_equal(a, b)


def _workers(cfg, path, family="builtin", dtype="float32", graphs=False):
    learner = Learner(cfg.trainer, cfg.model, cfg.rollout, str(path), seed=cfg.run.seed)
    learner.setup(threads=4)
    rollout = RolloutWorker(str(path), SamplingParams.of(cfg.rollout), seed=cfg.run.seed, threads=4, family=family,
                            dtype=dtype, graphs=graphs)
    rollout.setup()
    return learner, rollout


def test_grpo_on_the_device_raises_the_reward_and_syncs_exact_weights(device, tiny_config, sft_path, plugins,
                                                                      record_property):
    """Learner, graphed rollout worker and weight sync in one process: the graphs read the synced weights in place
    (stale ones would show as a log-prob mismatch and no learning)."""
    cfg = tiny_config("trainer.lr=3e-3", "trainer.kl_coef=0.0", "rollout.group_size=8",
                      "rewards=[{name: 'red_reward:redness'}]")
    learner, rollout = _workers(cfg, sft_path, graphs=True)
    assert learner.engine.device.type == device.type
    reward = RewardWorker(cfg.rewards)
    reward.setup()
    before = {k: v.detach().cpu().clone() for k, v in learner.state_dict().items()}
    prompts, metadata = prompts_of(shapes.train_items()[:4])
    history, start = [], time.perf_counter()
    for _ in range(16):
        batch = rollout.generate(prompts, metadata, 8)
        result = reward.score(batch.images, batch.prompts, batch.metadata)
        valid = torch.from_numpy(result.valid)
        adv = advantages(torch.from_numpy(result.total), 8, valid).values
        metrics = merge_ranks([learner.train_step(TrainBatch(batch.prompt_batch, batch.codes, batch.logprobs,
                                                             adv, valid))]).metrics
        rollout.load_weights(learner.state_dict(), learner.version)
        history.append(float(np.nanmean(result.total)))
    record_property("grpo_tiny_step_s", (time.perf_counter() - start) / 16)
    record_property("grpo_tiny_reward_first3_last3", f"{np.mean(history[:3]):.3f} -> {np.mean(history[-3:]):.3f}")
    assert np.mean(history[-3:]) > np.mean(history[:3]) + 0.06, history
    after = {k: v.detach().cpu() for k, v in learner.state_dict().items()}
    assert any(not torch.equal(before[k], after[k]) for k in before)
    synced = rollout.policy.model.state_dict()
    assert all(torch.equal(after[k], synced[k].cpu()) for k in after)
    assert metrics["learner/logprob_mismatch"] < 1e-3
    assert rollout.graph_failures() == {}


@pytest.mark.parametrize("stage", [0, 3])
def test_deepspeed_bfloat16_update_on_the_device(device, tiny_config, tmp_path, stage, record_property):
    path = tiny.build("janus", tmp_path / "janus")
    cfg = tiny_config("model.family=janus", f"model.path={path}", "model.dtype=bfloat16", "rollout.cfg_scale=2",
                      f"trainer.zero_stage={stage}", "trainer.lr=1e-2", "rollout.prompts_per_step=2",
                      "trainer.micro_batch_size=4")
    learner, rollout = _workers(cfg, path, family="janus", dtype="bfloat16")
    batch = rollout.generate(["a cat", "a dog"], [{}, {}], 4)
    before = {k: v.detach().cpu().clone() for k, v in learner.state_dict().items()}
    advantages = torch.tensor([1.0, -1.0, 0.5, -0.5] * 2)
    metrics = merge_ranks([learner.train_step(TrainBatch(batch.prompt_batch, batch.codes, batch.logprobs,
                                                         advantages, torch.ones(8, dtype=torch.bool)))]).metrics
    after = learner.state_dict()
    assert next(iter(after.values())).dtype == torch.bfloat16
    assert any(not torch.equal(before[k], after[k].cpu()) for k in before)
    record_property(f"bf16_logprob_mismatch_zero{stage}", metrics["learner/logprob_mismatch"])
    assert 0 <= metrics["learner/logprob_mismatch"] < 0.05
    rollout.load_weights(after, learner.version)
    assert rollout.checksum() == pytest.approx(learner.checksum(), rel=1e-6)


def _member(store: str, rank: int, result, backend: str = "gloo") -> None:
    try:
        torch.manual_seed(0)
        weights = {"embed": torch.randn(300, 64), "w": torch.randn(64, 64), "b": torch.randn(64)}
        if backend == "nccl":
            torch.cuda.set_device(rank)  # one GPU per member
        group = WeightBroadcast(store, rank, 2, timeout_s=60.0, backend=backend)
        on = torch.device("cuda", rank) if backend == "nccl" else torch.device(
            "cuda" if torch.cuda.is_available() else "cpu")
        if rank == 0:
            result.put((0, group.send({k: v.to(on) for k, v in weights.items()}, 3, 1 << 16)))
            return
        into = {k: torch.zeros_like(v, device=on) for k, v in weights.items()}
        version = group.receive(into, 1 << 16)
        result.put((1, version, all(torch.equal(into[k].cpu(), v) for k, v in weights.items())))
    except Exception as err:  # noqa: BLE001 - the parent asserts on it
        result.put((rank, f"{type(err).__name__}: {err}"))


@pytest.mark.parametrize("backend", ["gloo", "nccl"])
def test_weights_broadcast_between_two_processes_holding_device_tensors(device, tmp_path, backend):
    """Exact weights and version, device to device: over gloo (staged through host memory) on one GPU, over
    NCCL (buckets on the device) between two GPUs."""
    if backend == "nccl" and (device.type != "cuda" or torch.cuda.device_count() < 2):
        pytest.skip("NCCL between processes needs two CUDA GPUs")
    ctx = mp.get_context("spawn")
    result = ctx.Queue()
    procs = [ctx.Process(target=_member, args=(str(tmp_path / "store"), r, result, backend)) for r in range(2)]
    for p in procs:
        p.start()
    out = dict((item[0], item[1:]) for item in (result.get(timeout=120) for _ in procs))
    for p in procs:
        p.join(timeout=60)
    assert out[1] == (3, True), out
    assert out[0][0] == 4 * (300 * 64 + 64 * 64 + 64), out


def _graph_worker(family, tmp_path, dtype="float32"):
    worker = RolloutWorker(str(tiny.build(family, tmp_path / family)), SamplingParams(cfg_scale=3.0, top_k=20),
                           seed=0, family=family, dtype=dtype)
    worker.setup()
    prompts = worker.policy.prompt_batch(["a red apple", 'a sign that says "open"', "a cat"]).to(worker.device)
    return worker, prompts


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("family", ["janus", "emu3", "xomni"])
def test_cuda_graph_replay_is_bitwise_the_static_eager_loop(device, family, dtype, tmp_path, record_property):
    """The captured loop (code steps and Emu3's end-of-line steps, attention spans switching every 16 slots, the
    draw from the graphs' generator) gives exactly the codes, log-probs and generator state of the same loop run
    kernel by kernel; a second call replays the same graphs. On the CPU the uncaptured loop stands in."""
    from omnigrpo.rollout.graphs import GraphSet, static_decoder

    worker, prompts = _graph_worker(family, tmp_path, dtype)
    graphs = GraphSet()
    graphed = partial(graphs.decoder if device.type == "cuda" else static_decoder, unit=16)
    lm, params = worker.lm, worker.params
    eager_gen, graph_gen = (torch.Generator(device).manual_seed(11) for _ in range(2))
    eager, eager_lp = sample_images(lm, prompts, params, eager_gen, partial(static_decoder, unit=16))
    start = time.perf_counter()
    codes, logps = sample_images(lm, prompts, params, graph_gen, graphed)
    record_property(f"graph_{family}_{dtype}_capture_and_call_s", time.perf_counter() - start)
    again, _ = sample_images(lm, prompts, params, torch.Generator(device).manual_seed(11), graphed)
    assert torch.equal(codes, eager) and torch.equal(again, eager)
    assert torch.equal(logps, eager_lp)
    assert torch.equal(graph_gen.get_state(), eager_gen.get_state())
    if device.type == "cuda":
        assert not graphs.failures and len(graphs.loops) == 1  # one shape, captured once
        loop = next(iter(graphs.loops.values()))
        kinds = 2 if family == "emu3" else 1
        assert len(loop.graphs) == kinds * len(loop.spans) > kinds  # several spans, each captured once


@pytest.mark.parametrize("family", ["janus", "emu3", "xomni"])
def test_graphed_decoding_draws_what_growing_cache_decoding_draws(device, family, tmp_path):
    """Graphs with the default spans against the eager growing-cache decode (fp32): the same codes and stream."""
    from omnigrpo.rollout.graphs import GraphSet, static_decoder

    worker, prompts = _graph_worker(family, tmp_path)
    graphed = GraphSet().decoder if device.type == "cuda" else static_decoder
    eager_gen, graph_gen = (torch.Generator(device).manual_seed(3) for _ in range(2))
    eager, eager_lp = sample_images(worker.lm, prompts, worker.params, eager_gen)
    codes, logps = sample_images(worker.lm, prompts, worker.params, graph_gen, graphed)
    assert torch.equal(codes, eager)
    assert torch.allclose(logps, eager_lp, atol=1e-4)
    assert torch.equal(graph_gen.get_state(), eager_gen.get_state())


def test_hybrid_sampling_with_graphs_holds_no_rollout_copy(device, tiny_config, sft_path, record_property):
    """A hybrid learner samples from graphs over its live weights: the same codes as its eager sampling before and
    after an update (the packed copies refreshed in place); what its sampling holds beside the learner is less
    than what a rollout worker beside it (colocated) would hold. Both are measured after a throwaway graphed call
    has paid the process's one-time costs (cuBLAS workspaces of the capture streams), which either pays once."""
    from omnigrpo.trainers.hybrid import HybridLearner

    cfg = tiny_config("cluster.placement=hybrid", "rollout.cuda_graphs=true", "trainer.lr=3e-2")
    cuda = device.type == "cuda"
    learner = HybridLearner(cfg.trainer, cfg.model, cfg.rollout, str(sft_path), seed=cfg.run.seed)
    learner.setup(threads=4)
    graphed = learner.graphed
    assert (graphed is not None) == cuda
    prompts, metadata = prompts_of(shapes.train_items()[:4])
    if cuda:  # the one-time costs: a graphed call of another policy
        throwaway = RolloutWorker(str(sft_path), SamplingParams.of(cfg.rollout), seed=0, graphs=True)
        throwaway.setup()
        throwaway.generate(prompts[:1], metadata[:1], 1)
        del throwaway
    added = {}
    for _ in range(2):
        if not added:  # the first sampling phase: packed copies, the graphs' cache and pool
            added["hybrid"] = _held_memory(device, lambda: learner.generate(prompts, metadata, 4, seed=5))
        with_graphs = learner.generate(prompts, metadata, 4, seed=5)
        learner.graphed = None
        eager = learner.generate(prompts, metadata, 4, seed=5)
        learner.graphed = graphed
        assert torch.equal(with_graphs.codes, eager.codes)
        learner.train_step(TrainBatch(eager.prompt_batch, eager.codes, eager.logprobs, torch.linspace(-1, 1, 16),
                                      torch.ones(16, dtype=torch.bool)))
    if cuda:
        rollout = RolloutWorker(str(sft_path), SamplingParams.of(cfg.rollout), seed=0, graphs=True)
        added["rollout"] = _held_memory(device, lambda: (rollout.setup(), rollout.generate(prompts, metadata, 4)))
        record_property("hybrid_sampling_holds_mb", added["hybrid"] / 2**20)
        record_property("rollout_worker_holds_mb", added["rollout"] / 2**20)
        assert added["hybrid"] < added["rollout"]


def _held_memory(device: torch.device, fn) -> int:
    """CUDA bytes still allocated after ``fn`` beyond those before it (0 on the CPU)."""
    if device.type != "cuda":
        fn()
        return 0
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    return torch.cuda.memory_allocated(device) - base


def test_an_nccl_group_of_one_broadcasts_and_aborts(device, tmp_path):
    """The NCCL weight group forms with its own error handling (the process's environment left as it was), moves
    a bucket, and aborts cleanly; a dead peer's timeout needs two GPUs (not run on one)."""
    if device.type != "cuda":
        pytest.skip("NCCL needs a CUDA GPU")
    before = {k: os.environ.get(k) for k in ("TORCH_NCCL_BLOCKING_WAIT", "TORCH_NCCL_ASYNC_ERROR_HANDLING")}
    group = WeightBroadcast(str(tmp_path / "store"), 0, 1, timeout_s=30.0, backend="nccl")
    assert {k: os.environ.get(k) for k in before} == before
    assert os.environ["NCCL_SOCKET_IFNAME"]  # the loopback interface, named
    weights = {"w": torch.randn(64, 64, device=device), "b": torch.randn(64, device=device)}
    assert group.send(weights, 1, 1 << 16) == 4 * (64 * 64 + 64)
    group.abort()
