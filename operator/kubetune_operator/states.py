"""The operator's vocabulary as types: phases, condition types, reasons, what a
RayJob's status means, and the actions a decision can take.

All are `str` enums, so they are written to status and events as their plain
values and compare equal to them.
"""

from __future__ import annotations

from enum import Enum

from kubetune_api.models import Phase

__all__ = ["Action", "Cond", "Phase", "RayJobState", "Reason", "TERMINAL"]

TERMINAL = (Phase.Succeeded, Phase.Failed)


class RayJobState(str, Enum):
    """What the current RayJob's status means for the FineTuneJob."""

    NONE = "none"  # not created yet
    QUEUED = "queued"  # held suspended by Kueue
    STARTING = "starting"
    RUNNING = "running"
    SUSPENDED = "suspended"  # spec.suspend
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    INVALID = "invalid"  # KubeRay's ValidationFailed


class Action(str, Enum):
    """What a reconcile does beyond writing status."""

    NONE = "none"
    CREATE = "create"  # create the ConfigMap and RayJob (names are in status already)
    RETRY = "retry"  # record the next attempt's names, then delete the failed RayJob
    STOP = "stop"  # terminal: leave the RayJob for inspection
    STOP_AND_DELETE = "stop-and-delete"  # terminal: delete the RayJob so nothing runs on


class Cond(str, Enum):
    """Condition types. The phase conditions mirror `status.phase`; the others
    stand on their own."""

    Validated = "Validated"
    Queued = "Queued"
    Starting = "Starting"
    Running = "Running"
    Suspended = "Suspended"
    Succeeded = "Succeeded"
    Failed = "Failed"
    Checkpointed = "Checkpointed"
    StorageReadable = "StorageReadable"
    KubeRayAvailable = "KubeRayAvailable"
    ChildrenDeleted = "ChildrenDeleted"
    PodsScheduled = "PodsScheduled"
    ParentReady = "ParentReady"
    TrackingReachable = "TrackingReachable"
    RetentionRegressed = "RetentionRegressed"


# The condition that is True while the job is in a phase (Pending has none).
PHASE_CONDITION = {
    Phase.Queued: Cond.Queued,
    Phase.Starting: Cond.Starting,
    Phase.Running: Cond.Running,
    Phase.Suspended: Cond.Suspended,
    Phase.Succeeded: Cond.Succeeded,
    Phase.Failed: Cond.Failed,
}


class Reason(str, Enum):
    """Every reason the operator writes (status.reason, conditions, events)."""

    # phases
    Creating = "Creating"
    Queued = "Queued"
    QueueNotFound = "QueueNotFound"
    RayClusterStarting = "RayClusterStarting"
    Training = "Training"
    Suspended = "Suspended"
    Retrying = "Retrying"
    JobSucceeded = "JobSucceeded"
    # failures
    InvalidSpec = "InvalidSpec"
    RayJobValidationFailed = "RayJobValidationFailed"
    BackoffLimitExceeded = "BackoffLimitExceeded"
    DeadlineExceeded = "DeadlineExceeded"
    StartTimeout = "StartTimeout"
    # KubeRay could not get the Ray pods running
    PriorityClassNotFound = "PriorityClassNotFound"
    PodCreationFailed = "PodCreationFailed"
    PodQuotaExceeded = "PodQuotaExceeded"
    InvalidImage = "InvalidImage"
    ImagePullBackOff = "ImagePullBackOff"
    PodConfigError = "PodConfigError"
    # the scheduler finds no node for a Ray pod (PodsScheduled=False)
    Unschedulable = "Unschedulable"
    Scheduled = "Scheduled"
    # an object with a child's name that the job does not own
    NameConflict = "NameConflict"
    # spec.output.endpoint off the allowlist, with no secretRef
    EndpointNotAllowed = "EndpointNotAllowed"
    # standalone conditions
    SpecValid = "SpecValid"
    CheckpointCommitted = "CheckpointCommitted"
    Read = "Read"
    StorageTimeout = "StorageTimeout"
    StorageReadFailed = "StorageReadFailed"
    StorageReadQueued = "StorageReadQueued"
    StorageFileTooLarge = "StorageFileTooLarge"
    SchemeNotReadable = "SchemeNotReadable"
    RayJobCRDFound = "RayJobCRDFound"
    RayJobCRDNotFound = "RayJobCRDNotFound"
    TTLExpired = "TTLExpired"
    RayJobCreated = "RayJobCreated"
    OldAttemptDeleted = "OldAttemptDeleted"  # a RayJob an earlier attempt left behind
    # evaluation.retention.maxRegression
    RetentionAboveBound = "RetentionAboveBound"
    RetentionWithinBound = "RetentionWithinBound"
    # spec.model.fromJob
    ParentResolved = "ParentResolved"
    ParentNotFound = "ParentNotFound"
    ParentNotSucceeded = "ParentNotSucceeded"
    ParentFailed = "ParentFailed"
    # spec.tracking
    TrackingRunStarted = "TrackingRunStarted"
    TrackingUnreachable = "TrackingUnreachable"
