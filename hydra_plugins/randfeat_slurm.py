"""The launcher of ``hydra/launcher=slurm``: Hydra's submitit Slurm launcher, with a requeue on
SIGTERM in the job and one summary of the jobs that did not finish (:mod:`randfeat_torch.slurm`).
Hydra instantiates launchers only from the ``hydra_plugins`` package, hence this module's place.
Without the ``[slurm]`` extra there is no launcher to extend, and this module defines none."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

try:
    from hydra_plugins.hydra_submitit_launcher.submitit_launcher import (
        SlurmLauncher as SubmititSlurmLauncher,
    )
except ImportError:
    SubmititSlurmLauncher = None

if SubmititSlurmLauncher is not None:
    from hydra.core.utils import JobReturn

    class SlurmLauncher(SubmititSlurmLauncher):
        """Submitit's Slurm launcher; see :mod:`randfeat_torch.slurm` for what it adds (imported
        when used: Hydra imports every plugin module at start)."""

        def __call__(self, *args: Any, **kwargs: Any) -> JobReturn:  # in the job
            from randfeat_torch.slurm import requeue_on_stop

            with requeue_on_stop():
                return super().__call__(*args, **kwargs)

        def launch(
            self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int
        ) -> Sequence[JobReturn]:
            from randfeat_torch.slurm import launch

            return launch(self, job_overrides, initial_job_idx)
