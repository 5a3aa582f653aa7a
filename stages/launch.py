"""Run a stage under torchrun on this machine: what ``distributed.nproc_per_node`` above 1 does.

This process becomes torchrun's agent (``torch.distributed.launcher``, the API behind the ``torchrun``
command, with its rendezvous on a free local port, as ``torchrun --standalone``): it starts
``nproc_per_node`` copies of the same command, which find torchrun's environment, train together
(:mod:`minilm.distributed`) and write as rank 0, and it waits for them. The command DVC runs stays
``python -m stages.<name>``, so the stage keeps its deps, outs and resume from ``last``.

When a rank fails torchrun stops the others (SIGTERM, then SIGKILL); this process then exits with one
line naming the first rank that failed, instead of torchrun's multi-line report. A rank that failed
with a message of its own (a one-line error, exit code 2) is not reported twice.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import uuid

from minilm.config import DistributedConfig
from minilm.errors import TrainingError


def run_under_torchrun(stage: str, args: list[str], cfg: DistributedConfig) -> None:
    """Run ``python *args`` as ``cfg.nproc_per_node`` ranks on this machine; return when all succeeded."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)   # its report: ours below
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=cfg.nproc_per_node,
                          run_id=uuid.uuid4().hex, rdzv_backend="c10d", rdzv_endpoint="localhost:0",
                          max_restarts=0, monitor_interval=0.1)
    n = cfg.nproc_per_node
    if "OMP_NUM_THREADS" not in os.environ:    # torchrun's CLI sets 1; on CPU the cores are shared out
        os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // n))
    print(f"{stage}: running {n} processes under torchrun ({cfg.strategy}, backend {cfg.backend})",
          flush=True)
    try:
        elastic_launch(config, sys.executable)(*args)
    except SignalException:         # Ctrl-C / SIGTERM: the ranks were told too and saved `last`
        raise KeyboardInterrupt from None
    except ChildFailedError as err:
        rank, failure = err.get_first_failure()
        code = failure.exitcode
        if code >= 0:               # the rank said why itself (or was interrupted: 130)
            raise SystemExit(code or 1) from None
        try:
            how = f"killed by {signal.Signals(-code).name}"
        except ValueError:
            how = f"stopped by signal {-code}"
        raise TrainingError(f"{stage}: rank {rank} of {n} was {how}, so the other ranks were stopped; the "
                            "last checkpoint was kept: rerun the stage to resume") from None
