"""A learner rank's place in its group: the environment DeepSpeed reads, the store the ranks meet at, the
process group, the DeepSpeed engines and the weight-broadcast group.

Why apart from the learner: this is the set-up a rank does once, before and around the update; the learner
then only steps an engine. The group meets at a file store on one machine and at a TCP store that rank 0
serves on its node address across hosts (``omnigrpo.sync.network``); one rank meets in memory.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from omnigrpo.config.schema import TrainerConfig
from omnigrpo.sync.broadcast import WeightBroadcast
from omnigrpo.sync.network import LOOPBACK, interface_of, is_loopback, open_store, serve_store
from omnigrpo.trainers.engine import load_weights_only, skip_shared_memory_allreduce


@dataclass(frozen=True)
class Rank:
    """This learner process: rank ``rank`` of ``world_size``, its sockets bound on ``address`` (loopback on one
    machine, its node's own address across hosts)."""

    rank: int = 0
    world_size: int = 1
    address: str = LOOPBACK
    served: dict[str, object] = field(default_factory=dict)
    """The TCP stores this rank serves, by group (``learners``, ``weights``): rank 0 across hosts only."""

    def prepare(self, extensions_dir: str | None = None) -> torch.device:
        """Set what DeepSpeed and the collectives read from the environment, before DeepSpeed is imported (it
        picks its accelerator then); returns this rank's device: the GPU Ray assigned it, else the CPU."""
        gpu = torch.cuda.is_available()  # cluster.learner_gpus
        os.environ.setdefault("DS_ACCELERATOR", "cuda" if gpu else "cpu")
        interface = "lo" if is_loopback(self.address) else interface_of(self.address)
        # gloo and NCCL bind here. Set, not defaulted: a value inherited from elsewhere (a driver that ran a
        # local learner) would bind the wrong interface
        os.environ.update(GLOO_SOCKET_IFNAME=interface, NCCL_SOCKET_IFNAME=interface)
        if extensions_dir:
            os.environ.setdefault("TORCH_EXTENSIONS_DIR", extensions_dir)
        os.environ.update(RANK=str(self.rank), WORLD_SIZE=str(self.world_size), LOCAL_RANK="0")
        if gpu:
            torch.cuda.set_device(0)  # Ray's CUDA_VISIBLE_DEVICES leaves this actor its own GPU as device 0
        return torch.device("cuda", 0) if gpu else torch.device("cpu")

    def serve(self, group: str, size: int, timeout_s: float) -> str:
        """Rank 0 across hosts: serve the TCP store where ``group`` meets, on this node's address; returns its
        ``tcp://`` spec for the other members."""
        self.served[group], spec = serve_store(self.address, size, timeout_s)
        return spec

    def join(self, device: torch.device, rendezvous: str | None, timeout_s: float) -> None:
        """Join the learner group meeting at ``rendezvous`` (None: one rank) over NCCL on a GPU ``device``, else
        gloo, and hand it to DeepSpeed."""
        import deepspeed

        backend = "nccl" if device.type == "cuda" else "gloo"
        if backend == "gloo":
            skip_shared_memory_allreduce(deepspeed.ops)
        if not torch.distributed.is_initialized():  # a process that already holds a group (tests) keeps it
            torch.distributed.init_process_group(backend, store=self._store(rendezvous, timeout_s), rank=self.rank,
                                                 world_size=self.world_size)
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False)  # joins the group above

    def _store(self, rendezvous: str | None, timeout_s: float) -> torch.distributed.Store:
        """In memory for one rank, else the file or TCP store named (rank 0 across hosts serves it itself)."""
        if rendezvous is None:
            return torch.distributed.HashStore()
        served = self.served.get("learners")
        return served.store if served else open_store(rendezvous, self.world_size, timeout_s)

    def weight_group(self, store: str, size: int, timeout_s: float, backend: str = "gloo") -> WeightBroadcast:
        """The weight-broadcast group, joined as its sender (rank 0 of ``size``): rank 0 only."""
        served = self.served.get("weights")
        return WeightBroadcast(store, 0, size, timeout_s, self.address, served and served.store, backend)

    def gather_rows(self, n: int, micro_batch_size: int, score: Callable[[torch.Tensor], torch.Tensor]
                    ) -> torch.Tensor:
        """``score(rows)`` ``[len(rows), T]`` for all ``n`` rows of a batch, as ``[n, T]``: this rank scores rows
        ``chunk(world_size)[rank]`` in micro-batches (the same number of forwards on every rank, as ZeRO-3's
        gathered layers require), then the shares are all-gathered. A collective: every rank calls it."""
        rows = torch.arange(n).chunk(self.world_size)[self.rank]
        mine = torch.cat([score(r) for r in rows.split(micro_batch_size)])
        if self.world_size == 1:
            return mine
        parts = [torch.empty_like(mine) for _ in range(self.world_size)]
        torch.distributed.all_gather(parts, mine)
        return torch.cat(parts)


def training_engine(model: torch.nn.Module, trainer: TrainerConfig, ds_config: dict):
    """The DeepSpeed engine that trains ``model``'s trainable parameters with AdamW, and its optimiser; it reads
    checkpoints as plain data only (:func:`~omnigrpo.trainers.engine.load_weights_only`)."""
    import deepspeed

    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=trainer.lr, weight_decay=trainer.weight_decay)
    engine, optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    load_weights_only(engine)
    return engine, optimizer


def inference_engine(module: torch.nn.Module, ds_config: dict):
    """A DeepSpeed engine without an optimiser (ZeRO-Inference) around ``module``: under ZeRO-3 each rank holds
    ``1/world_size`` of its weights and gathers a layer's for the duration of its forward."""
    import deepspeed

    config = {k: v for k, v in ds_config.items() if k not in ("gradient_clipping", "zero_allow_untested_optimizer")}
    engine, *_ = deepspeed.initialize(model=module, config=config)
    return engine
