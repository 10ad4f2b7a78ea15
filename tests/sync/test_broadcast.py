"""The weight-broadcast group: bucketed and per-tensor sends arrive exactly; mismatches and hangs are errors."""

import multiprocessing as mp
import time

import pytest
import torch

from omnigrpo.sync.broadcast import WeightBroadcast, plan_buckets


def _weights(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shapes = {"embed": (50, 16), "layer.w": (16, 16), "layer.b": (16,), "head": (16, 50)}
    return {k: torch.randn(*s, generator=g) for k, s in shapes.items()}


def _member(store: str, rank: int, size: int, bucket: int, result, drop: str | None = None) -> None:
    try:
        group = WeightBroadcast(store, rank, size, timeout_s=5.0)
        if rank == 0:
            result.put((rank, group.send(_weights(0), 7, bucket)))
            return
        into = _weights(rank)  # different values, same layout
        if drop:
            into.pop(drop)
        version = group.receive(into, bucket)
        result.put((rank, version, all(torch.equal(into[k], v) for k, v in _weights(0).items())))
    except Exception as err:  # noqa: BLE001 - the parent asserts on it
        result.put((rank, f"{type(err).__name__}: {err}"))


def _run(tmp_path, size: int, bucket: int, drop: str | None = None, members: int | None = None) -> dict:
    ctx = mp.get_context("spawn")
    result = ctx.Queue()
    store = str(tmp_path / f"store-{time.monotonic_ns()}")
    procs = [ctx.Process(target=_member, args=(store, r, size, bucket, result, drop if r == 1 else None))
             for r in range(members or size)]
    for p in procs:
        p.start()
    out = {}
    for _ in procs:
        item = result.get(timeout=120)
        out[item[0]] = item[1:]
    for p in procs:
        p.join(timeout=60)
    return out


@pytest.mark.parametrize("bucket", [0, 2048, 1 << 20])
def test_every_receiver_gets_the_senders_weights(tmp_path, bucket):
    out = _run(tmp_path, size=3, bucket=bucket)
    total = sum(t.numel() * 4 for t in _weights(0).values())
    assert out[0] == (total,)
    assert out[1] == (7, True) and out[2] == (7, True)


def test_buckets_group_tensors_up_to_the_size():
    w = _weights(0)  # 3200, 1024, 64, 3200 bytes
    assert plan_buckets(w, 0) == [["embed"], ["layer.w"], ["layer.b"], ["head"]]
    assert plan_buckets(w, 4400) == [["embed", "layer.w", "layer.b"], ["head"]]
    assert plan_buckets(w, 1 << 20) == [list(w)]


def test_a_receiver_with_another_model_fails_clearly(tmp_path):
    out = _run(tmp_path, size=2, bucket=1 << 20, drop="layer.b")
    assert "do not match this model's 3" in out[1][0]


def test_a_missing_member_times_out_instead_of_hanging(tmp_path):
    start = time.monotonic()
    out = _run(tmp_path, size=3, bucket=1 << 20, members=2)  # rank 2 never joins
    assert all(isinstance(v[0], str) for v in out.values())  # both present members got an error
    assert time.monotonic() - start < 90
