"""The processes of a curation run: the only module of ``curation`` that knows about them.

A curation run is one process, or N processes started by a launcher that already exists
(``torchrun``, SLURM's ``srun``), talking through ``torch.distributed`` (gloo for the CPU
tensors every stage exchanges; NCCL is added for CUDA tensors when there is a GPU). No
engine of our own: ``Ranks`` reads what the launcher put in the environment, opens the process
group once, and offers the few things a stage needs:

- ``share(n)``: which of the ``n`` work items of a stage this rank runs. Work items are fixed by
  the DATA (units of the pool, grid chunks of ``cluster.chunk_size`` rows, index shards, hash
  buckets), never by the number of processes; the process count only decides who runs which.
- integer reductions (``all_reduce``: sum, max or min of int64 arrays, exact in any order),
  ``broadcast`` from rank 0, ``on_zero`` ("rank 0 does this, everyone gets the result or the
  error"), ``all_gather``, ``barrier``.

With one process there is no process group at all and every call is the identity, so a
one-process run behaves exactly as a run without this module. A rank that dies makes the
others stop at their next collective, with one line (``ProcessGroupError``), within the
process group's timeout at the latest (``dist.timeout_s``); under ``torchrun`` the launcher
stops them at once.
"""
from __future__ import annotations

import os
from datetime import timedelta
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence

import numpy as np

# collective payloads are cut into blocks of this many int64 (128 MiB) so a large reduction (10^6
# centroids x 768 fixed-point sums) never needs a second copy of the whole array in the transport
_BLOCK = 1 << 24


class ProcessGroupError(RuntimeError):
    """Another process of the run stopped, or did not answer within the timeout."""


def _env_int(env: Mapping[str, str], *names: str) -> Optional[int]:
    for name in names:
        value = env.get(name)
        if value not in (None, ""):
            return int(value)
    return None


def _slurm_local_world(env: Mapping[str, str]) -> Optional[int]:
    """Tasks on this node from SLURM_NTASKS_PER_NODE, or the first count of SLURM_TASKS_PER_NODE ("8(x2),4")."""
    direct = _env_int(env, "SLURM_NTASKS_PER_NODE")
    if direct:
        return direct
    spec = env.get("SLURM_TASKS_PER_NODE")
    return int(spec.split(",")[0].split("(")[0]) if spec else None


def launcher_ranks(env: Mapping[str, str] = os.environ) -> Dict[str, int]:
    """rank, world, local_rank, local_world from torchrun's variables, else SLURM's (srun), else one process."""
    if env.get("WORLD_SIZE") not in (None, ""):  # torchrun, torch.distributed.launch, any env:// launcher
        world = int(env["WORLD_SIZE"])
        return {"rank": _env_int(env, "RANK") or 0, "world": world, "local_rank": _env_int(env, "LOCAL_RANK") or 0,
                "local_world": _env_int(env, "LOCAL_WORLD_SIZE") or world}
    if env.get("SLURM_NTASKS") not in (None, "") and env.get("SLURM_PROCID") not in (None, ""):
        world = int(env["SLURM_NTASKS"])
        return {"rank": int(env["SLURM_PROCID"]), "world": world, "local_rank": _env_int(env, "SLURM_LOCALID") or 0,
                "local_world": _slurm_local_world(env) or world}
    return {"rank": 0, "world": 1, "local_rank": 0, "local_world": 1}


class Ranks:
    """This process's place among the processes of a run, and the collectives the stages use.

    Args:
        rank, world: this process's rank and the number of processes.
        local_rank, local_world: the same on this machine (``local_rank`` picks this process's GPU).
        timeout_s: the process group's timeout (named in the error when a peer stops answering).
    """

    def __init__(self, rank: int = 0, world: int = 1, local_rank: int = 0, local_world: int = 1,
                 timeout_s: float = 1800.0):
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} is outside a world of {world} processes")
        self.rank, self.world = int(rank), int(world)
        self.local_rank, self.local_world = int(local_rank), int(local_world)
        self.timeout_s = float(timeout_s)
        self.items = 0  # work items this rank ran in the current stage (run_stage resets and reports it)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_env(cls, timeout_s: float = 1800.0, env: Mapping[str, str] = os.environ) -> "Ranks":
        """The processes the launcher started; opens the process group when there are several.

        torchrun sets ``MASTER_ADDR`` / ``MASTER_PORT``; under ``srun`` export them first (the first host of
        the job and a free port), as the README shows.
        """
        r = launcher_ranks(env)
        ranks = cls(r["rank"], r["world"], r["local_rank"], r["local_world"], timeout_s)
        if ranks.world > 1:
            ranks._open_group(env)
        return ranks

    def _open_group(self, env: Mapping[str, str]) -> None:
        import torch
        import torch.distributed as dist

        if dist.is_initialized():
            if dist.get_world_size() != self.world or dist.get_rank() != self.rank:
                raise ProcessGroupError(f"a process group of {dist.get_world_size()} processes is already open, but "
                                        f"the launcher says {self.world}")
            return
        for name in ("MASTER_ADDR", "MASTER_PORT"):
            if not env.get(name):
                raise ProcessGroupError(f"{self.world} processes but {name} is not set: launch with torchrun, or "
                                        "under srun export MASTER_ADDR (the job's first host) and MASTER_PORT")
        backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
        if torch.cuda.is_available():
            torch.cuda.set_device(self.local_rank % torch.cuda.device_count())
        dist.init_process_group(backend, rank=self.rank, world_size=self.world, timeout=timedelta(seconds=self.timeout_s))

    # ------------------------------------------------------------------ who runs what
    @property
    def is_zero(self) -> bool:
        return self.rank == 0

    def share(self, n: int, count: bool = True) -> Iterator[int]:
        """The work items ``0 <= i < n`` this rank runs: a contiguous block (neighbouring items read
        neighbouring files). ``count``: add them to this rank's items of the stage (``done.json``)."""
        start, stop = self.rank * n // self.world, (self.rank + 1) * n // self.world
        for i in range(start, stop):
            if count:
                self.items += 1
            yield i

    def faiss_gpus(self, visible: int) -> List[int]:
        """The GPUs this process's faiss may use: its own (``LOCAL_RANK``) when there are several processes,
        every visible GPU for a single process."""
        if visible <= 0:
            return []
        return [self.local_rank % visible] if self.world > 1 else list(range(visible))

    # ------------------------------------------------------------------ collectives
    def _call(self, what: str, fn: Callable, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except RuntimeError as e:  # gloo: "Connection closed by peer", "Timed out waiting ..."
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ProcessGroupError(
                f"rank {self.rank} of {self.world}: another process stopped or did not answer within "
                f"{self.timeout_s:.0f} s ({what}: {first[:200]}); finished work items are kept: rerun the same "
                "command, with any number of processes, to resume") from None

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            self._call("barrier", dist.barrier)

    def all_reduce(self, array: np.ndarray, op: str = "sum") -> np.ndarray:
        """Elementwise sum, max or min of an int64 array over the processes (exact in any order).
        Floating point is refused: a float sum would depend on the order the ranks add in."""
        array = np.asarray(array)
        if array.dtype != np.int64:
            raise TypeError(f"all_reduce takes int64 arrays (exact in any order), not {array.dtype}")
        if self.world == 1:
            return array.copy()
        import torch
        import torch.distributed as dist

        ops = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}
        out = np.ascontiguousarray(array).copy()
        flat = torch.from_numpy(out.reshape(-1))  # shares memory with out
        for start in range(0, max(1, flat.numel()), _BLOCK):
            self._call("all_reduce", dist.all_reduce, flat[start:start + _BLOCK], op=ops[op])
        return out

    def broadcast(self, obj: Any = None) -> Any:
        """Rank 0's ``obj`` on every rank (any picklable value; large arrays: ``broadcast_array``)."""
        if self.world == 1:
            return obj
        import torch.distributed as dist

        box = [obj if self.is_zero else None]
        self._call("broadcast", dist.broadcast_object_list, box, src=0)
        return box[0]

    def broadcast_array(self, array: Optional[np.ndarray]) -> np.ndarray:
        """Rank 0's numeric array on every rank, sent in blocks."""
        if self.world == 1:
            return array
        import torch
        import torch.distributed as dist

        shape, dtype = self.broadcast((array.shape, array.dtype.str) if self.is_zero else None)
        out = np.ascontiguousarray(array) if self.is_zero else np.empty(shape, dtype=np.dtype(dtype))
        flat = torch.from_numpy(out.reshape(-1).view(np.uint8))
        for start in range(0, max(1, flat.numel()), 8 * _BLOCK):
            self._call("broadcast", dist.broadcast, flat[start:start + 8 * _BLOCK], src=0)
        return out

    def all_gather(self, obj: Any) -> List[Any]:
        """Every rank's ``obj``, in rank order (small values: counts, messages)."""
        if self.world == 1:
            return [obj]
        import torch.distributed as dist

        out: List[Any] = [None] * self.world
        self._call("all_gather", dist.all_gather_object, out, obj)
        return out

    def on_zero(self, fn: Callable, *args, **kwargs) -> Any:
        """Rank 0 runs ``fn``; every rank returns its result, or raises the error rank 0 met (one line,
        the same on every rank, so no rank waits for a peer that already gave up)."""
        if self.world == 1:
            return fn(*args, **kwargs)
        result, error = None, None
        if self.is_zero:
            try:
                result = fn(*args, **kwargs)
            except Exception as e:  # noqa: BLE001 -- re-raised below, on every rank
                error = e
        sent = self.broadcast(("error", _portable(error)) if error is not None else ("ok", result))
        if sent[0] == "error":
            if error is not None:
                raise error
            raise _rebuild(sent[1])
        return sent[1]

    def raise_together(self, error: Optional[BaseException]) -> None:
        """After work every rank did on its own share: if any rank met an error, every rank raises the first
        one (in rank order). Call it where all ranks arrive."""
        if self.world == 1:
            if error is not None:
                raise error
            return
        errors = self.all_gather(_portable(error) if error is not None else None)
        first = next((e for e in errors if e is not None), None)
        if first is not None:
            if error is not None and _portable(error) == first:
                raise error
            raise _rebuild(first)


def _portable(error: Optional[BaseException]):
    return None if error is None else (type(error).__module__, type(error).__name__, str(error))


def _rebuild(portable: Sequence[str]) -> BaseException:
    """The error another rank raised, as an instance of the same class when it is one of the known kinds."""
    from dinotxt.config import ConfigError

    module, name, message = portable
    known = {"ConfigError": ConfigError, "ValueError": ValueError, "FileNotFoundError": FileNotFoundError,
             "TypeError": TypeError, "ProcessGroupError": ProcessGroupError}
    return known.get(name, RuntimeError)(message)


SINGLE = Ranks()  # one process: what rank-0-alone work (levels >= 2, the report) runs under


__all__ = ["Ranks", "ProcessGroupError", "launcher_ranks", "SINGLE"]
