"""`python -m worker.distributed_job JOB_ID LEASE_TOKEN GPUS SPEC_JSON RESULT_JSON`: one multi-GPU job.

The worker's job process is a daemonic Celery child, and those may not start processes of their own
through multiprocessing; so a job with gpus > 1 runs this module as a plain subprocess, which becomes
the elastic agent (dpo_core.launch) of one rank per GPU. Rank 0 records progress through its own
connection to the job store, under the lease (token) of the run that started it, and publishes the
checkpoints it writes to the store (worker.publisher); this process writes rank 0's result, or the
error, to RESULT_JSON.
"""
from __future__ import annotations

import json
import sys
from dataclasses import asdict
from pathlib import Path

from dpo_core.data import DataError
from dpo_core.errors import TrainingError
from dpo_core.spec import SpecError, TrainingSpec
from service.db.leases import Lease
from service.settings import get_settings


def _outcome(lease: Lease, gpus: int, spec: TrainingSpec) -> dict:
    from dpo_core.launch import launch

    try:
        result = launch(spec, gpus, "worker.recorder:recorder_for_job", (get_settings(), lease, spec.output_dir))
    except (SpecError, DataError, TrainingError) as err:
        from worker.runner import _code, one_line

        return {"error": {"code": _code(err), "message": one_line(err)}}
    return {"result": asdict(result)}


def main(argv: list[str]) -> int:
    job_id, token, gpus, spec_path, result_path = argv
    spec = TrainingSpec.model_validate_json(Path(spec_path).read_text())
    lease = Lease(job_id, int(token), worker_id="")
    Path(result_path).write_text(json.dumps(_outcome(lease, int(gpus), spec)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
