"""Weight sync over a dedicated gloo or NCCL group: learner rank 0 -> every rollout actor, in buckets.

Why: through Ray's object store each reader deserialises its own copy of the state dict; a collective broadcast
streams the bytes once per hop. Ray's collective groups take over the process's *default* group, which the
learner's DeepSpeed group owns, so this group is built directly over a store of its own (``omnigrpo.sync.network``).
Small tensors travel packed in ``bucket_mb`` buckets, large ones from their own storage; a header (version, count,
hash of names and shapes) goes first, and every call is bounded by ``timeout_s``, so a dead member is an error the
driver falls back from. A plain class, no Ray (docs/design.md, "The GRPO step": weight sync and NCCL).
"""

from __future__ import annotations

import datetime
import hashlib
import os
from contextlib import contextmanager

import torch
import torch.distributed as dist

from omnigrpo.sync.network import LOOPBACK, interface_of, open_store

NCCL_GROUP_ENV = {"TORCH_NCCL_BLOCKING_WAIT": "1", "TORCH_NCCL_ASYNC_ERROR_HANDLING": "2"}
"""Read by ``ProcessGroupNCCL`` when it is built: waits that raise on timeout, a watchdog that cleans up only."""


@contextmanager
def environment(values: dict[str, str]):
    """``os.environ`` with ``values`` set inside the block, as it was after."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def plan_buckets(tensors: dict[str, torch.Tensor], bucket_bytes: int) -> list[list[str]]:
    """Consecutive names grouped into buckets of at most ``bucket_bytes`` (a larger tensor alone) and one
    dtype each; ``bucket_bytes <= 0`` gives one bucket per tensor."""
    buckets: list[list[str]] = []
    size, dtype = 0, None
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if not buckets or bucket_bytes <= 0 or t.dtype != dtype or size + nbytes > bucket_bytes:
            buckets.append([])
            size, dtype = 0, t.dtype
        buckets[-1].append(name)
        size += nbytes
    return buckets


def fingerprint(tensors: dict[str, torch.Tensor]) -> int:
    """A 62-bit hash of names, shapes and dtypes (what sender and receivers must agree on)."""
    text = ";".join(f"{k}:{tuple(v.shape)}:{v.dtype}" for k, v in tensors.items())
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") >> 2


class WeightBroadcast:
    """Member ``rank`` of a ``size``-member gloo (or ``nccl``) group (rank 0 sends) meeting at ``store`` (a file
    path, or ``tcp://host:port``; rank 0 passes the store it serves as ``served``), gloo's sockets bound to
    ``host``."""

    def __init__(self, store: str, rank: int, size: int, timeout_s: float = 120.0, host: str = LOOPBACK,
                 served: dist.Store | None = None, backend: str = "gloo"):
        self.rank, self.size = rank, size
        meeting = served or open_store(store, size, timeout_s)
        self.timeout = timeout = datetime.timedelta(seconds=timeout_s)
        if backend == "nccl":
            self.device = torch.device("cuda", torch.cuda.current_device())
            os.environ["NCCL_SOCKET_IFNAME"] = interface_of(host)  # read when the communicator first forms
            options = dist.ProcessGroupNCCL.Options()
            options._timeout = timeout
            with environment(NCCL_GROUP_ENV):
                self.group = dist.ProcessGroupNCCL(meeting, rank, size, options)
            return
        self.device = torch.device("cpu")
        options = dist.ProcessGroupGloo._Options()
        options._devices = [dist.ProcessGroupGloo.create_device(hostname=host)]
        options._timeout = timeout
        self.group = dist.ProcessGroupGloo(meeting, rank, size, options)

    def send(self, tensors: dict[str, torch.Tensor], version: int, bucket_bytes: int) -> int:
        """Rank 0: broadcast ``tensors`` stamped with ``version``; returns the bytes sent. Over gloo, GPU tensors
        are staged through host memory; over NCCL, CPU tensors through the device."""
        header = torch.tensor([version, len(tensors), fingerprint(tensors)], dtype=torch.int64, device=self.device)
        self._broadcast(header)
        sent = 0
        for names in plan_buckets(tensors, bucket_bytes):
            parts = [tensors[n].detach().reshape(-1) for n in names]
            flat = (parts[0] if len(parts) == 1 else torch.cat(parts)).to(self.device)  # lone, in place: no copy
            self._broadcast(flat)
            sent += flat.numel() * flat.element_size()
        return sent

    def _broadcast(self, tensor: torch.Tensor) -> None:
        """One broadcast from rank 0, waited for at most ``timeout_s``; on any error the group is aborted first."""
        try:
            self.group.broadcast(tensor, 0).wait(self.timeout)
        except Exception:
            self.abort()
            raise

    def abort(self) -> None:
        """Tear down an NCCL group's communicators at once (a stuck collective is not waited for); gloo has none."""
        nccl = getattr(dist, "ProcessGroupNCCL", None)  # absent from torch builds without CUDA
        if nccl is not None and isinstance(self.group, nccl):
            self.group.abort()

    def receive(self, into: dict[str, torch.Tensor], bucket_bytes: int) -> int:
        """Other ranks: receive a broadcast into the tensors of ``into`` (in place); returns its version."""
        header = torch.zeros(3, dtype=torch.int64, device=self.device)
        self._broadcast(header)
        version, count, digest = (int(x) for x in header)
        if count != len(into) or digest != fingerprint(into):
            raise RuntimeError(f"weight broadcast v{version}: the sender's {count} tensors do not match this "
                               f"model's {len(into)} (names, shapes or dtypes differ)")
        for names in plan_buckets(into, bucket_bytes):
            lone = into[names[0]]
            if len(names) == 1 and lone.is_contiguous() and lone.device == self.device:  # straight into its storage
                self._broadcast(into[names[0]].view(-1))
                continue
            flat = torch.empty(sum(into[n].numel() for n in names), dtype=into[names[0]].dtype, device=self.device)
            self._broadcast(flat)
            offset = 0
            with torch.no_grad():
                for n in names:
                    k = into[n].numel()
                    into[n].copy_(flat[offset : offset + k].view_as(into[n]))
                    offset += k
        return version
