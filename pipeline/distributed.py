"""Data-parallel runs of one job: which process am I, and the few collective steps a run needs.

Launchers: `torchrun --nproc_per_node=N -m pipeline ...` and `accelerate launch -m pipeline ...` (both set
RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT), or one `srun` task per GPU under SLURM (SLURM_PROCID,
SLURM_NTASKS (SLURM_STEP_NUM_TASKS), SLURM_LOCALID, read in an srun task when RANK/WORLD_SIZE are not set;
MASTER_ADDR/MASTER_PORT must then be exported, as jobs/ sbatch scripts do). Without any of these a run is one process (rank 0 of 1) and nothing here
touches torch.distributed.

With world_size > 1 a process group is started with the gloo backend, also on CUDA: the ranks never exchange
tensors, only a few small Python objects (rank 0's folder-lock decision, its drawn seeds and output folder) and a
barrier before generating, and gloo neither holds GPU memory nor has NCCL's watchdog time out a rank that waits
long for another (set SVDQ_DIST_BACKEND=nccl to override). On CUDA each rank uses `cuda:LOCAL_RANK` (made the
current device, so `cuda` means it everywhere); a task that sees a single GPU (CUDA_VISIBLE_DEVICES per task)
uses that one. Ranks > 0 log warnings and errors only, prefixed `[rank r]`, into the same console and
pipeline.log. How ranks share the work: pipeline/runner.py; their records: pipeline/ranks.py.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Mapping, Optional

from pipeline.errors import PipelineError

log = logging.getLogger("pipeline")

# Collectives wait this long for the slowest rank (rank 0 may wait job.wait_for_lock for the folder lock first).
TIMEOUT = timedelta(hours=float(os.environ.get("SVDQ_DIST_TIMEOUT_H", "24")))


class LaunchError(PipelineError):
    """The environment describes a multi-process launch that cannot work."""


@dataclass(frozen=True)
class Launch:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    launcher: str = "single"  # single | torchrun (also accelerate) | slurm

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def owns(self, batch_number: int) -> bool:
        """Batch i of the job (counted over all its batches) is made by rank i % world_size."""
        return batch_number % self.world_size == self.rank


def _int(env: Mapping[str, str], key: str) -> int:
    try:
        return int(env[key])
    except ValueError:
        raise LaunchError(f"environment variable {key}={env[key]!r} is not an integer") from None


def detect(env: Optional[Mapping[str, str]] = None) -> Launch:
    """The launch this process is part of, from its environment (see the module docstring)."""
    env = os.environ if env is None else env
    if "WORLD_SIZE" in env and "RANK" in env:
        world, rank = _int(env, "WORLD_SIZE"), _int(env, "RANK")
        local = _int(env, "LOCAL_RANK") if "LOCAL_RANK" in env else rank
        launcher = "torchrun"
    elif "SLURM_PROCID" in env and ("SLURM_STEP_NUM_TASKS" in env or "SLURM_STEP_ID" in env and "SLURM_NTASKS" in env):
        # a task of an srun step (a batch script itself has SLURM_NTASKS of the allocation, but no step)
        world = _int(env, "SLURM_STEP_NUM_TASKS" if "SLURM_STEP_NUM_TASKS" in env else "SLURM_NTASKS")
        rank = _int(env, "SLURM_PROCID")
        local = _int(env, "SLURM_LOCALID") if "SLURM_LOCALID" in env else 0
        launcher = "slurm"
    else:
        return Launch()
    if world < 1 or not 0 <= rank < world:
        raise LaunchError(f"rank {rank} of world size {world} ({launcher}): not a valid launch")
    if world > 1:
        missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if not env.get(k)]
        if missing:
            raise LaunchError(
                f"{launcher} started {world} processes but {' and '.join(missing)} "
                f"{'is' if len(missing) == 1 else 'are'} not set: the ranks cannot find each other. Export "
                "MASTER_ADDR (the first node's host name, e.g. `scontrol show hostnames $SLURM_JOB_NODELIST | "
                "head -n1`) and MASTER_PORT (a free port, e.g. 29500) before srun, or launch with torchrun.")
    return Launch(rank, world, local, launcher)


class Group:
    """The run's view of the launch: rank, world size, collectives (no-ops for one process)."""

    def __init__(self, launch: Launch):
        self.launch = launch
        self._started = False

    rank = property(lambda self: self.launch.rank)
    world_size = property(lambda self: self.launch.world_size)
    local_rank = property(lambda self: self.launch.local_rank)
    is_main = property(lambda self: self.launch.is_main)
    distributed = property(lambda self: self.launch.distributed)

    def start(self) -> "Group":
        """Join the process group (world_size > 1 only) and pick this rank's GPU; quiet ranks > 0's logs."""
        if not self.distributed:
            return self
        import torch
        import torch.distributed as dist

        if torch.cuda.is_available():
            count = torch.cuda.device_count()
            index = self.local_rank if self.local_rank < count else (0 if count == 1 else None)
            if index is None:
                raise LaunchError(f"LOCAL_RANK {self.local_rank} but only {count} GPUs are visible")
            torch.cuda.set_device(index)
        if not dist.is_initialized():
            env = {"RANK": self.rank, "WORLD_SIZE": self.world_size, "LOCAL_RANK": self.local_rank}
            for k, v in env.items():  # SLURM launches: env:// reads these
                os.environ.setdefault(k, str(v))
            backend = os.environ.get("SVDQ_DIST_BACKEND", "gloo")
            dist.init_process_group(backend=backend, rank=self.rank, world_size=self.world_size, timeout=TIMEOUT)
            self._started = True
        quiet_other_ranks(self.rank)
        return self

    def cuda_device(self):
        """This rank's CUDA device (the current one after start())."""
        import torch

        return torch.device("cuda", torch.cuda.current_device())

    def barrier(self) -> None:
        if self.distributed:
            import torch.distributed as dist

            dist.barrier()

    def share(self, obj: Any) -> Any:
        """Rank 0's `obj`, on every rank (ranks > 0 pass anything)."""
        if not self.distributed:
            return obj
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def stop(self) -> None:
        """Leave the process group (if this object started it): at the end of the run, also after errors."""
        if not self._started:
            return
        self._started = False
        import torch.distributed as dist

        try:
            if dist.is_initialized():
                dist.destroy_process_group()
        except Exception as e:  # never hide the run's own outcome
            log.debug("destroy_process_group: %s", e)

    def __enter__(self) -> "Group":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


_quieted = False


def quiet_other_ranks(rank: int) -> None:
    """Ranks > 0: only warnings and errors from the pipeline, each line prefixed `[rank r]` (console and log)."""
    global _quieted
    if rank == 0 or _quieted:
        return
    _quieted = True
    logging.getLogger("pipeline").setLevel(logging.WARNING)
    factory = logging.getLogRecordFactory()

    def prefixed(*args, **kwargs):
        record = factory(*args, **kwargs)
        record.msg = f"[rank {rank}] {record.msg}"
        return record

    logging.setLogRecordFactory(prefixed)
