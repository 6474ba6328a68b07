"""The decision: one switch on what the job's RayJob shows, with deadlines and
retries. Pure; never waits on storage (its reads are shown, never consulted)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Optional

from kubetune_api import models

from .conditions import get_condition, parse_time
from .names import KUEUE_QUEUE_LABEL, Body
from .rayjob_status import RECREATE, pod_trouble, rayjob_state
from .states import TERMINAL, Action, Cond, Phase, RayJobState, Reason


def _default(model, name: str):
    return model.model_fields[name].default


# The API's own defaults (the CRD's defaulting applies them to stored objects
# too; these cover objects written before a default existed).
DEFAULT_BACKOFF_LIMIT: int = _default(models.FineTuneJobSpec, "backoff_limit")
DEFAULT_KEEP_LAST: int = _default(models.Checkpointing, "keep_last")


@dataclass(frozen=True)
class Decision:
    """One reconcile's verdict: the phase to show and what to do about it."""

    phase: Phase
    reason: Reason
    message: str
    action: Action = Action.NONE


def decide(
    job: Body,
    rayjob: Optional[Body],
    now: datetime,
    queue_problem: Optional[str] = None,
    start_timeout: int = 0,
) -> Decision:
    """The one switch on the state of the job's current RayJob.

    `queue_problem` is what the operator found wrong with the job's Kueue
    queue (None when it exists or could not be checked). `start_timeout` is
    the operator-wide start limit in seconds (0: none), which the job's
    spec.startTimeoutSeconds overrides. What the scheduler said about the Ray
    pods arrives in the job's PodsScheduled condition. Storage is never an
    input: a slow store cannot delay a deadline, a retry or a success."""
    spec = job["spec"]
    status = job.get("status") or {}
    attempts = int(status.get("attempts") or 1)
    backoff = int(spec.get("backoffLimit", DEFAULT_BACKOFF_LIMIT))
    state = rayjob_state(job, rayjob)
    rj_status = (rayjob or {}).get("status") or {}
    why = rj_status.get("message") or rj_status.get("reason") or ""

    if state is RayJobState.INVALID:
        return Decision(
            Phase.Failed,
            Reason.RayJobValidationFailed,
            f"KubeRay rejected the RayJob: {why} (hint: {RECREATE})",
            Action.STOP,
        )
    if state is RayJobState.SUCCEEDED:
        return Decision(Phase.Succeeded, Reason.JobSucceeded, "training finished")
    if state is RayJobState.FAILED:
        if attempts <= backoff:
            return Decision(
                Phase.Starting,
                Reason.Retrying,
                f"attempt {attempts} failed ({why or 'Ray job failed'}); starting attempt "
                f"{attempts + 1} of {backoff + 1}, resuming from the last committed checkpoint",
                Action.RETRY,
            )
        return Decision(
            Phase.Failed,
            Reason.BackoffLimitExceeded,
            f"attempt {attempts} failed ({why or 'Ray job failed'}) and backoffLimit "
            f"{backoff} is used up (hint: the Ray job's logs say why: kubectl logs "
            f"job/{status.get('rayJobName') or job['metadata'].get('name')})",
            Action.STOP,
        )
    deadline = spec.get("activeDeadlineSeconds")
    started = parse_time(status.get("startTime"))
    if deadline and started and (now - started).total_seconds() > int(deadline):
        return Decision(
            Phase.Failed,
            Reason.DeadlineExceeded,
            f"the job ran longer than activeDeadlineSeconds ({deadline}s)",
            Action.STOP_AND_DELETE,
        )
    if state is RayJobState.NONE:
        return Decision(Phase.Pending, Reason.Creating, "creating the RayJob", Action.CREATE)
    if state is RayJobState.SUSPENDED:
        return Decision(
            Phase.Suspended, Reason.Suspended, "spec.suspend is true: the Ray cluster is stopped"
        )
    if state is RayJobState.QUEUED:
        queue = (job["metadata"].get("labels") or {}).get(KUEUE_QUEUE_LABEL)
        if queue_problem:
            return Decision(Phase.Queued, Reason.QueueNotFound, queue_problem)
        return Decision(
            Phase.Queued, Reason.Queued, f"waiting for admission in Kueue queue {queue}"
        )
    if state is RayJobState.RUNNING:
        return Decision(Phase.Running, Reason.Training, "the Ray job is running")
    trouble = pod_trouble(rayjob)
    if trouble is not None and trouble.terminal:
        # Delete the RayJob: KubeRay would retry the refused Pods forever.
        return Decision(Phase.Failed, trouble.reason, trouble.message, Action.STOP_AND_DELETE)
    waiting = Decision(
        Phase.Starting, Reason.RayClusterStarting, "waiting for the Ray cluster and job to start"
    )
    scheduled = get_condition(status, Cond.PodsScheduled)
    if trouble is not None:
        waiting = Decision(Phase.Starting, trouble.reason, trouble.message)
    elif scheduled and scheduled.get("status") == "False":
        waiting = Decision(Phase.Starting, Reason.Unschedulable, scheduled.get("message") or "")
    limit = spec.get("startTimeoutSeconds")
    limit = int(start_timeout if limit is None else limit)
    since = starting_since(job, rayjob)
    if limit > 0 and since is not None and (now - since).total_seconds() > limit:
        # Delete the RayJob: its waiting pods hold quota and the autoscaler's attention.
        return Decision(
            Phase.Failed,
            Reason.StartTimeout,
            f"the job did not start within startTimeoutSeconds ({limit}s): {waiting.message}",
            Action.STOP_AND_DELETE,
        )
    return waiting


def starting_since(job: Body, rayjob: Optional[Body]) -> Optional[datetime]:
    """When the current wait for the Ray pods began: the later of the job's
    entering Starting (after creation, a resume or Kueue's admission) and the
    current RayJob's creation (a retry's new Ray cluster); None before either."""
    cond = get_condition(job.get("status") or {}, Cond.Starting)
    if not cond or cond.get("status") != "True":
        return None  # not Starting yet: this reconcile is the first look
    times = [
        parse_time(cond.get("lastTransitionTime")),
        parse_time(((rayjob or {}).get("metadata") or {}).get("creationTimestamp")),
    ]
    return max((t for t in times if t is not None), default=None)


def ttl_remaining(job: Body, now: datetime) -> Optional[float]:
    """Seconds until finished-job cleanup; None when there is none to do."""
    status = job.get("status") or {}
    ttl = job["spec"].get("ttlSecondsAfterFinished")
    if ttl is None or status.get("phase") not in TERMINAL:
        return None
    done = parse_time(status.get("completionTime"))
    if done is None:
        return None
    return max(0.0, int(ttl) - (now - done).total_seconds())
