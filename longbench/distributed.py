"""Sharding across processes started by ``torchrun`` (or any launcher setting RANK and WORLD_SIZE).

Each rank takes every ``world``-th sample of the run (counted across its tasks) and writes its own
prediction file; ranks meet at barriers (a ``gloo`` process group, which works on CPU and GPU machines
alike) so that rank 0 can merge the files and score once everyone is done.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

BARRIER_TIMEOUT = timedelta(days=7)  # ranks may finish hours apart on long tasks


@dataclass
class Shard:
    """This process's place in the run: ``rank`` of ``world`` processes, ``local_rank`` on its host."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    _group: bool = False

    @classmethod
    def from_env(cls) -> Shard:
        """Read RANK / WORLD_SIZE / LOCAL_RANK; join a gloo group when there is more than one process."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", str(rank)))
        if world < 1 or not 0 <= rank < world:
            raise ValueError(f"bad RANK={rank} / WORLD_SIZE={world} in the environment")
        shard = cls(rank, world, local)
        if world > 1:
            import torch.distributed as dist

            if not dist.is_initialized():
                if "MASTER_ADDR" not in os.environ:
                    raise RuntimeError("WORLD_SIZE > 1 but MASTER_ADDR is unset: launch with torchrun "
                                       "(torchrun --nproc-per-node N -m kvpress.longbench ...)")
                dist.init_process_group("gloo", rank=rank, world_size=world, timeout=BARRIER_TIMEOUT)
                shard._group = True
        return shard

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def take(self, items: list, offset: int = 0) -> list:
        """This rank's share: the items whose global index ``offset + i`` is ``rank`` modulo ``world``.
        Passing the number of items of the earlier tasks as ``offset`` deals the samples of a whole run
        round-robin, so ranks stay balanced when tasks are small (3 records on 2 ranks: 2-1 per task,
        but 6-6 over 4 tasks)."""
        return items[(self.rank - offset) % self.world::self.world]

    def broadcast(self, value):
        """Rank 0's ``value`` on every rank (any picklable object); the value itself with one process."""
        if self.world == 1:
            return value
        import torch.distributed as dist

        box = [value if self.is_main else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()

    def close(self) -> None:
        if self._group:
            import torch.distributed as dist

            dist.destroy_process_group()
            self._group = False


def free_port() -> int:
    """An unused TCP port on localhost for the process group's rendezvous."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def spawn_local(module: str, argv: list[str], workers: int) -> int:
    """Run ``python -m <module> <argv>`` in ``workers`` local processes (what ``torchrun
    --nproc-per-node`` does, without the extra launcher): each gets RANK/WORLD_SIZE and a rendezvous on
    localhost. Returns the worst exit code."""
    import subprocess
    import sys

    port = str(free_port())
    procs = []
    for rank in range(workers):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(workers),
                   LOCAL_WORLD_SIZE=str(workers), MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        procs.append(subprocess.Popen([sys.executable, "-m", module, *argv], env=env))
    return _wait_all(procs)


def _wait_all(procs) -> int:
    """Wait for every process; if one fails, stop the others (they would wait at a barrier forever)."""
    import time

    while True:
        codes = [p.poll() for p in procs]
        failed = [c for c in codes if c not in (None, 0)]
        if failed:
            for p, code in zip(procs, codes):
                if code is None:
                    p.terminate()
            for p in procs:
                p.wait()
            return failed[0]
        if all(c == 0 for c in codes):
            return 0
        time.sleep(0.2)
