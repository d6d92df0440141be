"""Data-parallel training over several processes, one per GPU, launched by torchrun:

    torchrun --standalone --nproc_per_node 8 -m moebench train MoE-Mamba_100M --batch 64 --micro-batch 4

`train()` reads RANK / WORLD_SIZE / LOCAL_RANK from the environment (`from_env`); without them, or
with WORLD_SIZE=1, it is the single-process trainer, unchanged: no process group, no wrapper, no
collective. With WORLD_SIZE > 1 it starts the process group once per process (gloo on CPU, nccl on
CUDA, each rank on cuda:LOCAL_RANK), so that `moebench run` can train one variant after another.

DDP, not FSDP2. Every rank holds the whole model and its optimizer state, and DDP all-reduces the
gradients. Why:
  * It is exact. The all-reduced gradient is the single-process gradient of the same micro batches
    (the same sum, in another order), so `clip_grad_norm_`, fused AdamW, the checkpoint format (a plain
    state dict) and the MoE statistics stay what they are in one process.
  * It fits. MoE weights are not special under DDP: each MoE's experts are one (E, D, F) tensor, used
    by every forward (a token-less expert gets a zero gradient slice, never an unused parameter), so
    `find_unused_parameters` stays off. The largest variant, MoE-Mamba_100M, has 2.4B parameters
    (16 layers x 42 experts x 2 x 768 x 2304), nearly all experts: fp32 weights + gradients + AdamW
    moments = 16 B/param = 36 GiB per GPU, which an 80 GB H100 holds with room for activations.
    Measured on H100s (micro-batch 8 x 1024): peak 48.8 GiB in one process, 58.2 GiB on rank 0 of 2,
    i.e. one more fp32 copy of the gradients (9.1 GiB): with gradient_as_bucket_view, gradients set
    to None by zero_grad come back from the no_sync micro batches of an accumulating step as fresh
    tensors beside the buckets. So train() zeroes them in place under DDP with accumulation, which
    keeps them bucket views (tests/test_distributed.py checks it; the saving is not yet measured on
    GPUs). The 25M variants need a few GiB.
  * FSDP2 (`fully_shard` per block) would cut those 36 GiB to 36/N, at the price of all-gathering
    all 42 experts' weights in every micro batch's forward and backward (1.5x DDP's traffic, though
    a token uses one expert), DTensor-aware clipping and checkpoints gathered through
    `torch.distributed.checkpoint.state_dict`. It is the next step only if a variant stops fitting;
    for MoE at scale, expert parallelism (moving tokens, not weights) is the better tool. Neither is
    implemented: `Dist.wrap` is where either would go.

The data. Micro batches are numbered globally: micro batch k is `BatchSampler.batch_at(k)` of the
seed's stream (rank 0 of 1), and step s consists of micro batches s*A*W ... (s+1)*A*W - 1, with A the
per-rank accumulation and W the world size; rank r trains on its A consecutive ones
(`micro_batches`). So a step sees the same windows whatever the world size, as long as micro_batch
is the same: world 2 x micro b x accumulation 1 trains on exactly the sequences of world 1 x
micro b x accumulation 2, in micro batches of the same size, hence with the same MoE capacity
(capacity is computed over the micro batch's tokens). One process is the case W = 1, and reads the
stream as it always did.

Metrics. The step's loss is the mean over ranks (each rank's mean over its micro batches); MoE
statistics are means over ranks (LB loss, dropped fraction) or sums (tokens per expert); tokens/s
counts the global batch, so it is the sum over ranks. Validation: rank r evaluates the fixed
validation batches [r::W] and the sums are reduced, so val_loss is the single-process value (the
batches are set by the TrainConfig alone, never by W: with micro_batch unset a validation batch
holds `batch` sequences, as in one process). peak_mem_gib is rank 0's.

Checkpoints are written by rank 0 only (so are curve.csv and the result row): the model state dict
without DDP's `module.` prefix, the optimizer state (the same on every rank), the global step and,
as the sampler's position, the global number of micro batches consumed. Nothing depends on the rank
or the world size, so a run may resume at another world size (or in one process):
  * exactly reproduced: model, optimizer, step, learning-rate schedule, EMA, curve so far; and the
    data order too when the micro batch is the same (set --micro-batch explicitly);
  * not reproduced: the data order when the micro batch changes with W (micro_batch left unset
    means batch / W per rank), since the windows of a micro batch depend on its size; then the
    run goes on with fresh windows (a warning says so), and the loss curve differs from an
    uninterrupted run's within noise.
Between W = 1 and W = 2 the test finds curves and weights bitwise equal; other W sum the gradients
and statistics in another order, so expect agreement to rounding, not to the bit.

Stopping. All ranks take every decision to stop together, with a collective each step: a
non-finite loss is seen by all (the all-reduced mean is NaN too); a Ctrl-C / SIGTERM on any rank
(torchrun forwards Ctrl-C to every worker) is all-reduced as a flag, then rank 0 saves, all ranks
meet at a barrier and raise. torchrun kills its workers 30 s after forwarding the signal, so a save
that takes longer leaves the previous checkpoint (saves are atomic). A rank that dies on its own
(an exception, OOM) makes torchrun end the others; the last checkpoint is kept.
"""
from __future__ import annotations

import atexit
import os
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from moebench.errors import UserError


@dataclass(frozen=True)
class Dist:
    """This process's place in the job; `Dist()` is the single process (every method a no-op)."""
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def init(self, device: torch.device) -> None:
        """Start the process group unless WORLD_SIZE is 1 or it is running already (`moebench run`
        trains several variants in one process, and tests may start it themselves)."""
        if self.world == 1:
            return
        if device.type == "cuda":
            torch.cuda.set_device(device)   # NCCL and the mamba kernels use the current device
        if dist.is_initialized():
            if dist.get_world_size() != self.world or dist.get_rank() != self.rank:
                raise UserError(f"a process group of {dist.get_world_size()} ranks (this one {dist.get_rank()}) "
                                f"is running, but the environment says rank {self.rank} of {self.world}")
            return
        # MASTER_ADDR / MASTER_PORT from torchrun (env://); NCCL's own variables (NCCL_NVLS_ENABLE ...) untouched
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                device_id=device if device.type == "cuda" else None)
        atexit.register(_destroy)

    def wrap(self, model: nn.Module) -> nn.Module:
        """The module to call for training: DDP over several ranks (see the module docstring), the
        model itself in one process. Evaluation and checkpoints use the model itself."""
        if self.world == 1:
            return model
        dev = next(model.parameters()).device
        # gradients live in DDP's buckets instead of a second full-size copy
        return DDP(model, device_ids=[dev.index] if dev.type == "cuda" else None, gradient_as_bucket_view=True)

    def zero_grad(self, opt: torch.optim.Optimizer, accum: int) -> None:
        """After a step. Under DDP with accumulation, gradients set to None come back from the no_sync
        micro batches as fresh tensors beside DDP's buckets (one more fp32 copy of every gradient:
        9 GiB for MoE-Mamba_100M); zeroed in place they stay views of the buckets. Otherwise None
        (no memset)."""
        opt.zero_grad(set_to_none=not (self.world > 1 and accum > 1))

    def micro_batches(self, step: int, accum: int) -> range:
        """Global numbers of the micro batches this rank trains on at `step` (see the docstring)."""
        first = (step * self.world + self.rank) * accum
        return range(first, first + accum)

    def mean(self, x: torch.Tensor) -> float:
        """Mean of a scalar over ranks, as a Python float (one sync: the NaN check needs it anyway)."""
        if self.world == 1:
            return x.item()
        x = x.detach().float().clone()
        dist.all_reduce(x)
        return x.item() / self.world

    def any(self, flag: bool, device: torch.device) -> bool:
        """True on every rank when `flag` is true on any rank."""
        if self.world == 1:
            return flag
        t = torch.tensor(float(flag), device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def sum_(self, x: torch.Tensor) -> torch.Tensor:
        """Sum over ranks, in place (returns x)."""
        if self.world > 1:
            dist.all_reduce(x)
        return x

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    @contextmanager
    def main_first(self):
        """Rank 0 runs the block first (preparing the default corpus once), then the other ranks."""
        if not self.is_main:
            self.barrier()
        yield
        if self.is_main:
            self.barrier()


def from_env() -> Dist:
    """RANK / WORLD_SIZE / LOCAL_RANK as torchrun sets them; Dist() when WORLD_SIZE is unset or 1."""
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world <= 1:
        return Dist()
    try:
        rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    except (KeyError, ValueError):
        raise UserError(f"WORLD_SIZE={world} but RANK / LOCAL_RANK are missing or not integers: "
                        f"launch with torchrun") from None
    if not 0 <= rank < world:
        raise UserError(f"RANK={rank} outside WORLD_SIZE={world}")
    return Dist(rank, world, local_rank)


def split_batch(batch: int, micro_batch: int | None, world: int) -> tuple[int, int]:
    """(micro batch per forward, accumulation steps per rank) for a global `batch` of sequences:
    batch = micro x world x accumulation. micro_batch None means no accumulation: batch / world."""
    if world == 1:
        micro = micro_batch or batch
        if batch % micro:
            raise UserError(f"batch {batch} is not a multiple of micro_batch {micro}")
        return micro, batch // micro
    micro = micro_batch or batch // world
    if micro < 1 or batch % (micro * world):
        parts = f"micro_batch {micro_batch} x {world} ranks" if micro_batch else f"{world} equal ranks"
        raise UserError(f"global batch {batch} does not split into {parts}: batch = micro_batch x ranks x "
                        f"accumulation steps per rank; change --batch or --micro-batch")
    return micro, batch // (micro * world)


def grad_sync(model: nn.Module, last: bool):
    """Context for one micro batch's forward and backward: DDP all-reduces the gradients after
    the last micro batch of a step only (no_sync before it)."""
    return model.no_sync() if not last and isinstance(model, DDP) else nullcontext()


def _destroy() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
