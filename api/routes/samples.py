"""/v1/fine_tuning/jobs/{id}/samples: what the reference and the policy answer to the job's fixed prompts
(training.samples), at one sampling step."""
from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request
from sqlalchemy import select

from api.deps import CurrentCaller, read_job
from api.schemas.jobs import SamplesPublic
from service.db.models import Sample
from service.errors import NotFound

router = APIRouter(prefix="/fine_tuning/jobs/{fine_tuning_job_id}/samples", tags=["fine-tuning jobs"])

Step = Annotated[int | None, Query(ge=0, le=2**62, description="a step with samples; default: the latest")]


@router.get("", response_model=SamplesPublic)
async def get_samples(fine_tuning_job_id: str, request: Request, caller: CurrentCaller, step: Step = None):
    """Per prompt, the reference's and the policy's completions at `step`, their lengths and rewards."""
    return await read_job(request, caller, fine_tuning_job_id, _samples, step)


def _samples(session, _principal, job, step: int | None) -> SamplesPublic:
    steps = list(session.scalars(select(Sample.step).where(Sample.job_id == job.id).order_by(Sample.step)))
    empty = SamplesPublic(fine_tuning_job_id=job.id, step=None, steps=steps, summary=None, data=[])
    if step is None and not steps:
        return empty
    wanted = steps[-1] if step is None else step
    found = session.get(Sample, (job.id, wanted))
    if found is None:
        listed = ", ".join(map(str, steps)) or "none yet"
        raise NotFound(f"job {job.id} has no samples at step {step}; steps with samples: {listed}", param="step")
    return SamplesPublic(fine_tuning_job_id=job.id, step=found.step, steps=steps, summary=found.summary,
                         data=found.records)
