"""OpenAI's fine-tuning objects <-> FineTuneJobs: pure functions, plain dicts, no I/O.

- a job id is the FineTuneJob's name: `ftjob-` + 24 hex digits, made at create;
- `fine_tuned_model` is `ft:{base}:{namespace}:{suffix}:{job id}`; a job created
  from such a name continues that job (`spec.model.fromJob`);
- statuses come from the FineTuneJob's phase (STATUS_BY_PHASE), `cancelled` from
  the annotation the cancel endpoint writes;
- what the caller asked for (model name, file ids, suffix, metadata, method) is
  kept in one annotation, so the job object reads back as it was created.
"""

from __future__ import annotations

import calendar
import copy
import hashlib
import json
import re
import secrets
import time
from dataclasses import dataclass, field
from typing import Any, Optional

from kubetune_api import models, objectives, storage
from kubetune_api.validation import SpecError, resolve_spec

JOB_PREFIX = "ftjob-"
FILE_PREFIX = "file-"
FT_PREFIX = "ft:"
LABEL_API = "kubetune.io/openai-api"  # on every FineTuneJob this server creates
ANN_REQUEST = "kubetune.io/openai-request"
ANN_CANCELLED = "kubetune.io/openai-cancelled"

_JOB_ID = re.compile(r"^ftjob-[a-z0-9]([a-z0-9-]{0,55}[a-z0-9])?$")
_FILE_ID = re.compile(r"^file-[a-z0-9]{24}$")
_SUFFIX = re.compile(r"^[A-Za-z0-9._-]{0,64}$")
_CATALOG_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,127}$")
_CKPT = re.compile(r"^ckpt-step-(\d+)$")

METHODS = ("supervised", "dpo", "reinforcement")
# The file formats each method trains on (datafile.FORMATS).
METHOD_FORMATS = {"supervised": ("chat", "prompt-completion"), "dpo": ("preference",)}
METADATA_MAX = 16

# FineTuneJob phase -> OpenAI status. Starting (the Ray cluster is being
# scheduled) waits for capacity like a queued job; Suspended is `paused`.
STATUS_BY_PHASE = {
    None: "validating_files",
    "Pending": "validating_files",
    "Queued": "queued",
    "Starting": "queued",
    "Running": "running",
    "Suspended": "paused",
    "Succeeded": "succeeded",
    "Failed": "failed",
}
TERMINAL = ("succeeded", "failed", "cancelled")


# ---------------------------------------------------------------------------- errors


class ApiError(Exception):
    """An answer in OpenAI's error object: {"error": {message, type, param, code}}."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: Optional[str] = None,
        code: Optional[str] = None,
        type: str = "invalid_request_error",
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type

    def body(self) -> dict:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


def bad_request(message: str, param: Optional[str] = None, code: Optional[str] = None):
    return ApiError(400, message, param=param, code=code)


def not_found(message: str, param: Optional[str] = None) -> ApiError:
    return ApiError(404, message, param=param, code="not_found")


# ---------------------------------------------------------------------------- ids


def new_job_name() -> str:
    return JOB_PREFIX + secrets.token_hex(12)


def new_file_id() -> str:
    return FILE_PREFIX + secrets.token_hex(12)


def job_name(job_id: str) -> str:
    """The FineTuneJob behind a job id (they are the same text); 404 for any other text."""
    if not isinstance(job_id, str) or not _JOB_ID.match(job_id):
        raise not_found(f"No fine-tuning job found with id {job_id!r}", "fine_tuning_job_id")
    return job_id


def check_file_id(file_id: Any, param: str = "file_id") -> str:
    if not isinstance(file_id, str) or not _FILE_ID.match(file_id):
        raise bad_request(f"Invalid file id {file_id!r}: ids look like file-<24 hex>", param)
    return file_id


def fine_tuned_model(base: str, namespace: str, suffix: Optional[str], job_id: str) -> str:
    return f"{FT_PREFIX}{base}:{namespace}:{suffix or ''}:{job_id}"


@dataclass
class FtName:
    base: str
    namespace: str
    suffix: str
    job_id: str
    checkpoint_step: Optional[int] = None


def parse_ft_name(name: str) -> FtName:
    """`ft:{base}:{namespace}:{suffix}:{job id}[:ckpt-step-N]` -> its parts."""
    parts = name[len(FT_PREFIX) :].split(":")
    step = None
    if len(parts) == 5 and (m := _CKPT.match(parts[4])):
        step = int(m.group(1))
        parts = parts[:4]
    if len(parts) != 4 or not all(parts[i] for i in (0, 1, 3)) or not _JOB_ID.match(parts[3]):
        raise bad_request(
            f"model {name!r} is not a fine-tuned model name: they read "
            "ft:<base>:<namespace>:<suffix>:<job id>, as a succeeded job's fine_tuned_model",
            "model",
            "model_not_found",
        )
    return FtName(parts[0], parts[1], parts[2], parts[3], step)


# ---------------------------------------------------------------------------- time


def unix(stamp: Optional[str]) -> Optional[int]:
    """RFC 3339 (as Kubernetes and the trainer write it) -> Unix seconds."""
    if not isinstance(stamp, str) or len(stamp) < 19:
        return None
    try:
        return calendar.timegm(time.strptime(stamp[:19], "%Y-%m-%dT%H:%M:%S"))
    except ValueError:
        return None


def rfc3339(seconds: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))


# ---------------------------------------------------------------------------- catalog


CATALOG_KEY = "models.yaml"


@dataclass
class CatalogEntry:
    id: str
    model: dict  # spec.model fields
    spec: dict = field(default_factory=dict)  # spec defaults (resources, method.type, ...)
    description: str = ""


def parse_catalog(doc: Any, where: str) -> dict[str, CatalogEntry]:
    """The catalog ConfigMap's `models.yaml`, already loaded: {models: [{id, model, spec}]}.
    Raises ValueError naming the entry at fault (the platform team's to fix)."""
    if not isinstance(doc, dict) or not isinstance(doc.get("models"), list):
        raise ValueError(f"{where}: {CATALOG_KEY} must hold `models:`, a list")
    out: dict[str, CatalogEntry] = {}
    for i, item in enumerate(doc["models"]):
        label = f"{where} models[{i}]"
        if not isinstance(item, dict):
            raise ValueError(f"{label}: not a mapping")
        mid, model, spec = item.get("id"), item.get("model"), item.get("spec") or {}
        if not isinstance(mid, str) or not _CATALOG_ID.match(mid):
            raise ValueError(f"{label}: id {mid!r}: letters, digits, . _ / - (no ':')")
        if not isinstance(model, dict) or not (model.get("name") or model.get("uri")):
            raise ValueError(f"{label} ({mid}): model needs name or uri (spec.model fields)")
        if not isinstance(spec, dict) or "model" in spec:
            raise ValueError(f"{label} ({mid}): spec must be a mapping of spec fields but model")
        if mid in out:
            raise ValueError(f"{label}: id {mid!r} appears twice")
        out[mid] = CatalogEntry(mid, model, spec, str(item.get("description") or ""))
    return out


# ---------------------------------------------------------------------------- create


@dataclass
class Settings:
    """What the platform configures once (the chart's api.* values)."""

    files_uri: str
    output_uri: str
    endpoint: Optional[str] = None
    region: Optional[str] = None
    job_secret: Optional[str] = None  # Secret in each tenant namespace, for the trainer

    def access(self) -> dict:
        out: dict = {}
        if self.endpoint:
            out["endpoint"] = self.endpoint
        if self.region:
            out["region"] = self.region
        if self.job_secret:
            out["secretRef"] = {"name": self.job_secret}
        return out


@dataclass
class CreateRequest:
    model: str
    training_file: str
    validation_file: Optional[str]
    method: str
    hyperparameters: dict  # OpenAI names; "auto" or a number
    suffix: Optional[str]
    seed: Optional[int]
    metadata: dict

    def record(self) -> dict:
        return {
            "model": self.model,
            "training_file": self.training_file,
            "validation_file": self.validation_file,
            "method": self.method,
            "hyperparameters": self.hyperparameters,
            "suffix": self.suffix,
            "seed": self.seed,
            "metadata": self.metadata,
        }


_HYPER = {
    # name: (python types, low, high, inclusive low)
    "n_epochs": ((int,), 1, 1000, True),
    "batch_size": ((int,), 1, 4096, True),
    "learning_rate_multiplier": ((int, float), 0, 100, False),
    "beta": ((int, float), 0, 100, False),
}
_METHOD_HYPER = {
    "supervised": ("n_epochs", "batch_size", "learning_rate_multiplier"),
    "dpo": ("n_epochs", "batch_size", "learning_rate_multiplier", "beta"),
    # listed only (a request for it is refused): GRPO jobs made with kubectl
    "reinforcement": ("n_epochs", "batch_size", "learning_rate_multiplier"),
}
# spec.method.objective -> OpenAI's method type, for jobs listed through the API
# (made here or with kubectl). KTO and distillation have no OpenAI counterpart: they
# list as supervised, and the job object's `kubetune.objective` says which it is.
OPENAI_METHOD = {
    "sft": "supervised",
    "dpo": "dpo",
    "grpo": "reinforcement",
    "kto": "supervised",
    "distill": "supervised",
}


def _objective_of(job: dict) -> str:
    objective = ((job.get("spec") or {}).get("method") or {}).get("objective") or "sft"
    return objective if objective in objectives.BY_NAME else "sft"


def _hyper(values: Any, allowed: tuple, param: str) -> dict:
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise bad_request(f"{param} must be an object", param)
    out = {}
    for key, value in values.items():
        where = f"{param}.{key}"
        if key not in allowed:
            raise bad_request(
                f"{where} is not a hyperparameter of this method (use {', '.join(allowed)})",
                where,
            )
        if value == "auto" or value is None:
            continue
        types, low, high, inclusive = _HYPER[key]
        if isinstance(value, bool) or not isinstance(value, types):
            kind = "an integer" if types == (int,) else "a number"
            raise bad_request(f"{where} must be {kind} or 'auto', not {value!r}", where)
        if value > high or value < low or (value == low and not inclusive):
            lowest = f"at least {low}" if inclusive else f"above {low}"
            raise bad_request(f"{where} must be {lowest} and at most {high}", where)
        out[key] = value
    return out


def parse_create(body: Any) -> CreateRequest:
    """The body of POST /v1/fine_tuning/jobs, checked field by field (400 names the field)."""
    if not isinstance(body, dict):
        raise bad_request("The request body must be a JSON object")
    known = {
        "model",
        "training_file",
        "validation_file",
        "hyperparameters",
        "method",
        "suffix",
        "seed",
        "metadata",
        "integrations",
    }
    unknown = sorted(set(body) - known)
    if unknown:
        raise bad_request(f"Unrecognized request argument supplied: {unknown[0]}", unknown[0])
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad_request("model is required: a catalog model or an ft: name", "model")
    training = check_file_id(body.get("training_file"), "training_file")
    validation = body.get("validation_file")
    if validation is not None:
        check_file_id(validation, "validation_file")
    if body.get("integrations"):
        raise bad_request(
            "integrations are not supported: set spec.tracking (MLflow) on the FineTuneJob "
            "instead (see docs/openai-compatible.md)",
            "integrations",
        )
    method = body.get("method") or {"type": "supervised"}
    if not isinstance(method, dict) or method.get("type") not in METHODS:
        raise bad_request(f"method.type must be one of {', '.join(METHODS)}", "method.type")
    mtype = method["type"]
    if mtype == "reinforcement":
        raise bad_request(
            "method reinforcement is not supported: use supervised or dpo",
            "method.type",
            "unsupported_method",
        )
    for other in METHODS:
        if other != mtype and method.get(other) is not None:
            raise bad_request(f"method.{other} is set but method.type is {mtype}", "method")
    allowed = _METHOD_HYPER[mtype]
    hyper = _hyper(body.get("hyperparameters"), _METHOD_HYPER["supervised"], "hyperparameters")
    inner = method.get(mtype) or {}
    if not isinstance(inner, dict):
        raise bad_request(f"method.{mtype} must be an object", f"method.{mtype}")
    hyper |= _hyper(inner.get("hyperparameters"), allowed, f"method.{mtype}.hyperparameters")
    suffix = body.get("suffix")
    if suffix is not None and (not isinstance(suffix, str) or not _SUFFIX.match(suffix)):
        raise bad_request(
            "suffix: up to 64 letters, digits, '.', '_' or '-' (it becomes part of the "
            "fine_tuned_model name, whose parts ':' separates)",
            "suffix",
        )
    seed = body.get("seed")
    if seed is not None and (
        isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= 2**31 - 1
    ):
        raise bad_request("seed must be an integer from 0 to 2147483647", "seed")
    metadata = body.get("metadata") or {}
    if not isinstance(metadata, dict) or len(metadata) > METADATA_MAX:
        raise bad_request(f"metadata: an object of at most {METADATA_MAX} pairs", "metadata")
    for k, v in metadata.items():
        if not isinstance(v, str) or len(k) > 64 or len(v) > 512:
            raise bad_request(
                "metadata keys: at most 64 characters; values: text of at most 512", "metadata"
            )
    return CreateRequest(
        model, training, validation, mtype, hyper, suffix or None, seed, dict(metadata)
    )


def deep_merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def parent_model(parent: dict) -> dict:
    """spec.model of a job that continues `parent`: the parent's base, fromJob the parent."""
    model = {
        k: v
        for k, v in (parent.get("spec") or {}).get("model", {}).items()
        if k not in ("fromJob", "fromCheckpoint", "mergeParent")
    }
    return model | {"fromJob": parent["metadata"]["name"]}


def build_job(
    req: CreateRequest,
    *,
    name: str,
    namespace: str,
    settings: Settings,
    files: dict[str, dict],
    base_id: str,
    model: dict,
    defaults: Optional[dict] = None,
) -> dict:
    """The FineTuneJob for a create request. `files` maps file ids to their stored
    records (datafile: format, uri); `model` is spec.model (a catalog entry's or
    `parent_model`); `defaults` the catalog entry's spec defaults."""
    train = files[req.training_file]
    want = METHOD_FORMATS[req.method]
    for param, fid in (
        ("training_file", req.training_file),
        ("validation_file", req.validation_file),
    ):
        if fid is None:
            continue
        fmt = files[fid]["format"]
        if fmt not in want:
            raise bad_request(
                f"{param} {fid} holds {fmt} rows; method {req.method} trains on "
                f"{' or '.join(want)} rows (see docs/openai-compatible.md)",
                param,
                "invalid_file_format",
            )
    access = settings.access()
    dataset: dict = {"train": {"uri": train["uri"]}, "format": train["format"]} | access
    spec: dict = {"model": model, "dataset": dataset}
    if req.validation_file:
        dataset["validation"] = {"uri": files[req.validation_file]["uri"]}
    else:
        # OpenAI trains on the whole file when no validation file is given.
        dataset["validationSplit"] = 0.0
        spec["evaluation"] = {"enabled": False}
    method: dict = {"objective": "dpo" if req.method == "dpo" else "sft"}
    if "beta" in req.hyperparameters:
        method["dpo"] = {"beta": req.hyperparameters["beta"]}
    spec["method"] = method
    hp: dict = {}
    if "n_epochs" in req.hyperparameters:
        hp["epochs"] = req.hyperparameters["n_epochs"]
    if "batch_size" in req.hyperparameters:
        hp["batchSize"] = req.hyperparameters["batch_size"]
    if req.seed is not None:
        hp["seed"] = req.seed
    spec["hyperparameters"] = hp
    spec["output"] = {"uri": settings.output_uri} | access
    defaults = copy.deepcopy(defaults or {})
    if "epochs" in hp:  # n_epochs replaces a catalog's maxSteps (the API takes one of them)
        (defaults.get("hyperparameters") or {}).pop("maxSteps", None)
    spec = deep_merge(defaults, spec)
    if "learning_rate_multiplier" in req.hyperparameters:
        kind = (spec.get("method") or {}).get("type", "lora")
        table = objectives.BY_NAME["dpo" if req.method == "dpo" else "sft"].learning_rate
        lr = table.get(kind, table["lora"]) * req.hyperparameters["learning_rate_multiplier"]
        spec["hyperparameters"]["learningRate"] = float(f"{lr:.6g}")
    record = req.record() | {"base": base_id}
    return {
        "apiVersion": models.API_VERSION,
        "kind": models.KIND,
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": {LABEL_API: "v1"},
            "annotations": {ANN_REQUEST: json.dumps(record, sort_keys=True)},
        },
        "spec": spec,
    }


# ---------------------------------------------------------------------------- read back


def request_of(job: dict) -> dict:
    raw = ((job.get("metadata") or {}).get("annotations") or {}).get(ANN_REQUEST)
    try:
        rec = json.loads(raw) if raw else {}
    except ValueError:
        rec = {}
    return rec if isinstance(rec, dict) else {}


def openai_status(job: dict) -> str:
    phase = (job.get("status") or {}).get("phase")
    status = STATUS_BY_PHASE.get(phase, "queued")
    cancelled = ((job.get("metadata") or {}).get("annotations") or {}).get(ANN_CANCELLED)
    if cancelled and status != "succeeded":
        return "cancelled"
    return status


def job_fine_tuned_model(job: dict) -> Optional[str]:
    if openai_status(job) != "succeeded":
        return None
    rec = request_of(job)
    meta = job["metadata"]
    base = rec.get("base") or _base_of_spec(job)
    return fine_tuned_model(base, meta["namespace"], rec.get("suffix"), meta["name"])


def _base_of_spec(job: dict) -> str:
    model = (job.get("spec") or {}).get("model") or {}
    text = model.get("name") or model.get("uri") or "model"
    return text.replace(":", "_")


def _number(value: Any) -> Any:
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def effective_hyperparameters(job: dict, method: str) -> dict:
    """What the job trains with, in OpenAI's names (kubetune's defaults filled in)."""
    rec = request_of(job)
    asked = rec.get("hyperparameters") or {}
    try:
        spec = resolve_spec(copy.deepcopy(job.get("spec") or {}))
    except (SpecError, ValueError, TypeError):
        return {k: asked.get(k, "auto") for k in _METHOD_HYPER.get(method, ())}
    hp = spec.hyperparameters
    table = objectives.BY_NAME[spec.method.objective].learning_rate
    default_lr = table.get(spec.method.type, table["lora"])
    out = {
        "n_epochs": _number(hp.epochs) if hp.epochs is not None else "auto",
        "batch_size": hp.batch_size,
        "learning_rate_multiplier": float(f"{hp.learning_rate / default_lr:.6g}"),
    }
    if method == "dpo" and spec.method.dpo is not None:
        out["beta"] = spec.method.dpo.beta
    return out


def job_object(job: dict, trained_tokens: Optional[int] = None, now: Optional[float] = None):
    """A FineTuneJob as OpenAI's `fine_tuning.job` object."""
    meta, status = job["metadata"], job.get("status") or {}
    rec = request_of(job)
    spec = job.get("spec") or {}
    method = rec.get("method") or OPENAI_METHOD[_objective_of(job)]
    state = openai_status(job)
    hyper = effective_hyperparameters(job, method)
    error = None
    if state == "failed":
        error = {
            "code": status.get("reason") or "failed",
            "message": status.get("message") or "The fine-tuning job failed",
            "param": None,
        }
    finished = unix(status.get("completionTime")) if state in TERMINAL else None
    if state == "cancelled":
        cancelled = (meta.get("annotations") or {}).get(ANN_CANCELLED)
        finished = unix(cancelled)
    eta = (status.get("progress") or {}).get("etaSeconds")
    estimated = int((now or time.time()) + eta) if state == "running" and eta else None
    seed = (spec.get("hyperparameters") or {}).get("seed", models.Hyperparameters().seed)
    method_hyper = {k: v for k, v in hyper.items() if k in _METHOD_HYPER.get(method, ())}
    outputs = status.get("outputs") or {}
    return {
        "id": meta["name"],
        "object": "fine_tuning.job",
        "created_at": unix(meta.get("creationTimestamp")) or 0,
        "error": error,
        "fine_tuned_model": job_fine_tuned_model(job),
        "finished_at": finished,
        "hyperparameters": {k: v for k, v in hyper.items() if k != "beta"},
        "model": rec.get("model") or _base_of_spec(job),
        "organization_id": meta["namespace"],
        "result_files": [],
        "seed": seed,
        "status": state,
        "trained_tokens": trained_tokens if state == "succeeded" else None,
        "training_file": rec.get("training_file") or "",
        "validation_file": rec.get("validation_file"),
        "estimated_finish": estimated,
        "integrations": [],
        "metadata": rec.get("metadata") or None,
        "method": {"type": method, method: {"hyperparameters": method_hyper}},
        "user_provided_suffix": rec.get("suffix"),
        # Not OpenAI's: where the job is on the cluster (no credentials, only URIs).
        "kubetune": {
            "namespace": meta["namespace"],
            "name": meta["name"],
            "objective": _objective_of(job),
            "phase": status.get("phase"),
            "reason": status.get("reason"),
            "adapter": outputs.get("adapter"),
            "merged_model": outputs.get("mergedModel"),
            "prefix": outputs.get("prefix"),
        },
    }


def matches_metadata(job: dict, wanted: dict[str, str]) -> bool:
    have = request_of(job).get("metadata") or {}
    return all(have.get(k) == v for k, v in wanted.items())


def newest_first(jobs: list[dict]) -> list[dict]:
    return sorted(
        jobs,
        key=lambda j: (unix(j["metadata"].get("creationTimestamp")) or 0, j["metadata"]["name"]),
        reverse=True,
    )


# ---------------------------------------------------------------------------- pages


def parse_limit(value: Optional[str], default: int, most: int = 100) -> int:
    if value is None or value == "":
        return default
    try:
        n = int(value)
    except ValueError:
        raise bad_request(f"limit must be an integer, not {value!r}", "limit") from None
    if not 1 <= n <= most:
        raise bad_request(f"limit must be from 1 to {most}", "limit")
    return n


def page(items: list[dict], after: Optional[str], limit: int) -> dict:
    """A cursor page as the client pages: items after the one with id `after`."""
    start = 0
    if after:
        ids = [i["id"] for i in items]
        start = ids.index(after) + 1 if after in ids else len(items)
    data = items[start : start + limit]
    return {"object": "list", "data": data, "has_more": start + limit < len(items)}


# ---------------------------------------------------------------------------- events


def _event_id(key: str) -> str:
    return "ftevent-" + hashlib.sha256(key.encode()).hexdigest()[:24]


def _event(key, created, message, level="info", kind="message", data=None) -> dict:
    return {
        "id": _event_id(key),
        "object": "fine_tuning.job.event",
        "created_at": created,
        "level": level,
        "message": message,
        "data": data or {},
        "type": kind,
    }


def _metric_data(row: dict, total: Optional[int]) -> dict:
    data = {"step": row.get("step")}
    if total:
        data["total_steps"] = total
    for src, dst in (
        ("loss", "train_loss"),
        ("evalLoss", "valid_loss"),
        ("evalTokenAccuracy", "valid_mean_token_accuracy"),
        ("rewardAccuracy", "train_reward_accuracy"),
        ("evalRewardAccuracy", "valid_reward_accuracy"),
        ("learningRate", "learning_rate"),
        ("tokens", "trained_tokens"),
    ):
        if row.get(src) is not None:
            data[dst] = row[src]
    return data


def job_events(job: dict, kube_events: list[dict], metrics: list[dict]) -> list[dict]:
    """Events of a job, newest first: its creation, the operator's Kubernetes
    events, one `metrics` event per metrics row the trainer wrote, and the end."""
    meta, status = job["metadata"], job.get("status") or {}
    created = unix(meta.get("creationTimestamp")) or 0
    uid = meta.get("uid", meta["name"])
    out: list[tuple[int, int, dict]] = []
    out.append(
        (created, 0, _event(f"{uid}/created", created, f"Created fine-tuning job: {meta['name']}"))
    )
    for i, ev in enumerate(kube_events):
        when = (
            unix(ev.get("eventTime"))
            or unix(ev.get("lastTimestamp"))
            or unix(ev.get("firstTimestamp"))
            or unix((ev.get("metadata") or {}).get("creationTimestamp"))
            or created
        )
        level = "warn" if ev.get("type") == "Warning" else "info"
        text = f"{ev.get('reason') or 'Event'}: {ev.get('message') or ''}".strip()
        key = (ev.get("metadata") or {}).get("uid") or f"k8s/{i}/{text}"
        out.append((when, 1, _event(key, when, text, level)))
    start = unix(status.get("startTime")) or created
    total = (status.get("progress") or {}).get("totalSteps")
    for row in metrics:
        step = row.get("step")
        if not isinstance(step, int) or (row.get("loss") is None and row.get("evalLoss") is None):
            continue
        when = unix(row.get("time")) or start
        parts = []
        if row.get("loss") is not None:
            parts.append(f"training loss={row['loss']:.4f}")
        if row.get("evalLoss") is not None:
            parts.append(f"validation loss={row['evalLoss']:.4f}")
        where = f"Step {step}/{total}" if total else f"Step {step}"
        data = _metric_data(row, total)
        key = f"{uid}/metrics/{step}/{'eval' if row.get('loss') is None else 'train'}"
        out.append(
            (
                when,
                2 + step,
                _event(key, when, f"{where}: {', '.join(parts)}", "info", "metrics", data),
            )
        )
    state = openai_status(job)
    # The closing messages are the newest, whenever the operator's own events landed.
    end = max([unix(status.get("completionTime")) or start] + [t for t, _, _ in out])
    big = 1 << 40
    if state == "succeeded":
        model = job_fine_tuned_model(job)
        out.append(
            (end, big, _event(f"{uid}/model", end, f"New fine-tuned model created: {model}"))
        )
        out.append((end, big + 1, _event(f"{uid}/done", end, "The job has successfully completed")))
    elif state == "failed":
        text = f"The job failed: {status.get('reason') or ''}: {status.get('message') or ''}"
        out.append((end, big, _event(f"{uid}/failed", end, text.rstrip(": "), "error")))
    elif state == "cancelled":
        when = max(unix((meta.get("annotations") or {}).get(ANN_CANCELLED)) or end, end)
        out.append((when, big, _event(f"{uid}/cancelled", when, "The job was cancelled")))
    out.sort(key=lambda t: (t[0], t[1]), reverse=True)
    return [e for _, _, e in out]


# ---------------------------------------------------------------------------- checkpoints


def job_checkpoints(job: dict, metrics: list[dict]) -> list[dict]:
    """status.checkpoints (committed ones the job keeps) as OpenAI's checkpoint
    objects, newest first, with the training metrics of their step."""
    meta, status = job["metadata"], job.get("status") or {}
    by_step = {}
    for row in metrics:
        if isinstance(row.get("step"), int):
            by_step.setdefault(row["step"], {}).update(
                {k: v for k, v in row.items() if v is not None}
            )
    rec = request_of(job)
    base = rec.get("base") or _base_of_spec(job)
    model = fine_tuned_model(base, meta["namespace"], rec.get("suffix"), meta["name"])
    created = unix(meta.get("creationTimestamp")) or 0
    out = []
    for ck in status.get("checkpoints") or []:
        step = ck.get("step")
        if not isinstance(step, int):
            continue
        row = by_step.get(step, {})
        metrics_obj: dict = {"step": step}
        if row.get("loss") is not None:
            metrics_obj["train_loss"] = row["loss"]
        eval_loss = ck.get("evalLoss", row.get("evalLoss"))
        if eval_loss is not None:
            metrics_obj["valid_loss"] = eval_loss
            metrics_obj["full_valid_loss"] = eval_loss
        if row.get("evalTokenAccuracy") is not None:
            metrics_obj["full_valid_mean_token_accuracy"] = row["evalTokenAccuracy"]
        out.append(
            {
                "id": f"ftckpt-{meta['name'][len(JOB_PREFIX) :]}-{step}",
                "object": "fine_tuning.job.checkpoint",
                "created_at": unix(ck.get("time")) or created,
                "fine_tuned_model_checkpoint": f"{model}:ckpt-step-{step}",
                "fine_tuning_job_id": meta["name"],
                "metrics": metrics_obj,
                "step_number": step,
            }
        )
    out.sort(key=lambda c: c["step_number"], reverse=True)
    return out


def checkpoint_uri(job: dict, step: int) -> Optional[str]:
    for ck in (job.get("status") or {}).get("checkpoints") or []:
        if ck.get("step") == step:
            return ck.get("uri")
    return None


def job_prefix(settings: Settings, job: dict) -> Optional[str]:
    """The job's storage prefix when it writes under this server's output URI (the
    only store the server reads with its own credentials), else None."""
    out = ((job.get("spec") or {}).get("output") or {}).get("uri")
    meta = job["metadata"]
    if out != settings.output_uri or not meta.get("uid"):
        return None
    return storage.job_prefix(out, meta["namespace"], meta["name"], meta["uid"])
