"""The HTTP server (aiohttp): OpenAI's `/v1/files` and `/v1/fine_tuning/jobs`.

Every request: bearer token -> TokenReview -> the namespace (the client's
`project`, i.e. the OpenAI-Project header; else a ServiceAccount's own
namespace; else --default-namespace) -> SubjectAccessReview for the verb on
finetunejobs there -> the work, done with the caller's token. Errors are
OpenAI's error object. Tokens are never logged.
"""

from __future__ import annotations

import asyncio
import logging
import re
import tempfile
import time
from dataclasses import dataclass
from typing import Optional

from aiohttp import web

from . import datafile, mapping
from .kube import Caller, Identity, Kube
from .mapping import ApiError, bad_request, not_found
from .store import Store

log = logging.getLogger("kubetune.api")

_NAMESPACE = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
CHUNK = 1 << 20


@dataclass
class App:
    kube: Kube
    store: Store
    settings: mapping.Settings
    default_namespace: Optional[str] = None
    max_upload_bytes: int = 512 << 20


@dataclass
class Request:
    identity: Identity
    namespace: str
    caller: Caller


APP_KEY = web.AppKey("kubetune_api", App)


def _run(fn, *args, **kwargs):
    return asyncio.to_thread(fn, *args, **kwargs)


async def authorize(request: web.Request, verb: str) -> Request:
    app: App = request.app[APP_KEY]
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise ApiError(
            401,
            "You didn't provide an API key: send a Kubernetes token as the bearer token "
            "(the client's api_key)",
            code="invalid_api_key",
        )
    ident = await _run(app.kube.review, token)
    namespace = (
        request.headers.get("OpenAI-Project")
        or ident.service_account_namespace
        or app.default_namespace
    )
    if not namespace:
        raise bad_request(
            "No namespace: pass it as the client's project (the OpenAI-Project header)",
            "project",
        )
    if not _NAMESPACE.match(namespace):
        raise bad_request(f"project {namespace!r} is not a namespace name", "project")
    ok, reason = await _run(app.kube.allowed, ident, namespace, verb)
    if not ok:
        why = f" ({reason})" if reason else ""
        raise ApiError(
            403,
            f"{ident.username} may not {verb} finetunejobs.kubetune.io in namespace "
            f"{namespace}{why}: ask for a RoleBinding there",
            code="forbidden",
        )
    return Request(ident, namespace, app.kube.caller(token))


def json_response(obj, status: int = 200) -> web.Response:
    return web.json_response(obj, status=status)


@web.middleware
async def errors(request: web.Request, handler):
    started = time.monotonic()
    status = 500
    try:
        response = await handler(request)
        status = response.status
        return response
    except ApiError as exc:
        status = exc.status
        return json_response(exc.body(), exc.status)
    except web.HTTPException as exc:
        status = exc.status
        if exc.status == 404:
            err = not_found(f"Unknown request URL: {request.method} {request.path}")
        elif exc.status == 405:
            err = ApiError(405, f"Method {request.method} is not allowed on {request.path}")
        elif exc.status == 413:
            err = ApiError(413, "The upload is larger than this server accepts", code="too_large")
        else:
            err = ApiError(exc.status, exc.reason or "request failed")
        return json_response(err.body(), exc.status)
    except Exception as exc:  # noqa: BLE001 - a bug answers 500, never a traceback
        log.exception(
            "unhandled error on %s %s: %s", request.method, request.path, type(exc).__name__
        )
        err = ApiError(500, "The server had an error processing the request", type="server_error")
        return json_response(err.body(), 500)
    finally:
        log.info(
            "%s %s %s %.0fms",
            request.method,
            request.path,
            status,
            (time.monotonic() - started) * 1e3,
        )


# ---------------------------------------------------------------------------- files


def _public(record: dict) -> dict:
    return {k: record.get(k) for k in (
        "id", "object", "bytes", "created_at", "filename", "purpose", "status",
        "expires_at", "status_details",
    )}  # fmt: skip


async def create_file(request: web.Request) -> web.Response:
    app: App = request.app[APP_KEY]
    ctx = await authorize(request, "create")
    if not request.content_type.startswith("multipart/"):
        raise bad_request("Upload files as multipart/form-data with fields file and purpose")
    reader = await request.multipart()
    purpose, filename, size, expires = None, None, 0, {}
    with tempfile.NamedTemporaryFile(prefix="kubetune-upload-") as tmp:
        while (part := await reader.next()) is not None:
            if part.name == "purpose":
                purpose = (await part.text()).strip()
            elif part.name == "file":
                filename = part.filename or "upload.jsonl"
                while chunk := await part.read_chunk(CHUNK):
                    size += len(chunk)
                    if size > app.max_upload_bytes:
                        raise ApiError(
                            413,
                            f"The file is larger than {app.max_upload_bytes} bytes, this "
                            "server's limit",
                            param="file",
                            code="file_too_large",
                        )
                    tmp.write(chunk)
            elif part.name in ("expires_after[anchor]", "expires_after[seconds]"):
                expires[part.name[len("expires_after[") : -1]] = (await part.text()).strip()
            else:
                await part.release()
        tmp.flush()
        if filename is None:
            raise bad_request("Missing required parameter: 'file'", "file")
        if purpose != "fine-tune":
            raise bad_request(
                f"purpose {purpose!r} is not supported here: this server takes fine-tune files",
                "purpose",
            )

        expires_at = _expires_at(expires)

        def check_and_store():
            with open(tmp.name, "rb") as f:
                checked = datafile.check(f, filename)
            file_id = mapping.new_file_id()
            record = {
                "id": file_id,
                "object": "file",
                "bytes": size,
                "created_at": int(time.time()),
                "filename": filename,
                "purpose": purpose,
                "status": "processed",
                "expires_at": expires_at,
                "status_details": None,
                "format": checked.format,
                "rows": checked.rows,
            }
            return app.store.put(ctx.namespace, file_id, record, tmp.name, checked.converted)

        record = await _run(check_and_store)
    log.info(
        "file %s uploaded to namespace %s by %s", record["id"], ctx.namespace, ctx.identity.username
    )
    return json_response(_public(record))


EXPIRES_MIN, EXPIRES_MAX = 3600, 30 * 24 * 3600  # OpenAI's bounds


def _expires_at(expires: dict) -> Optional[int]:
    if not expires:
        return None
    if expires.get("anchor") != "created_at":
        raise bad_request("expires_after[anchor] must be created_at", "expires_after.anchor")
    try:
        seconds = int(expires.get("seconds", ""))
    except ValueError:
        seconds = 0
    if not EXPIRES_MIN <= seconds <= EXPIRES_MAX:
        raise bad_request(
            f"expires_after[seconds] must be from {EXPIRES_MIN} to {EXPIRES_MAX}",
            "expires_after.seconds",
        )
    return int(time.time()) + seconds


def _expired(record: dict) -> bool:
    return bool(record.get("expires_at")) and record["expires_at"] <= time.time()


async def _file(app: App, namespace: str, file_id: str) -> dict:
    try:
        mapping.check_file_id(file_id)
    except ApiError:
        raise not_found(f"No such File object: {file_id}", "id") from None
    record = await _run(app.store.get, namespace, file_id)
    if record is None or _expired(record):
        raise not_found(f"No such File object: {file_id}", "id")
    return record


async def list_files(request: web.Request) -> web.Response:
    app: App = request.app[APP_KEY]
    ctx = await authorize(request, "list")
    q = request.query
    purpose = q.get("purpose")
    order = q.get("order", "desc")
    if order not in ("asc", "desc"):
        raise bad_request("order must be asc or desc", "order")
    limit = mapping.parse_limit(q.get("limit"), 10000, 10000)
    records = await _run(app.store.list, ctx.namespace)
    records = [
        r for r in records if (not purpose or r.get("purpose") == purpose) and not _expired(r)
    ]
    records.sort(key=lambda r: (r.get("created_at", 0), r["id"]), reverse=order == "desc")
    return json_response(mapping.page([_public(r) for r in records], q.get("after"), limit))


async def retrieve_file(request: web.Request) -> web.Response:
    app: App = request.app[APP_KEY]
    ctx = await authorize(request, "get")
    return json_response(_public(await _file(app, ctx.namespace, request.match_info["id"])))


async def file_content(request: web.Request) -> web.Response:
    app: App = request.app[APP_KEY]
    ctx = await authorize(request, "get")
    record = await _file(app, ctx.namespace, request.match_info["id"])
    data = await _run(app.store.content, ctx.namespace, record["id"])
    return web.Response(body=data, content_type="application/octet-stream")


async def delete_file(request: web.Request) -> web.Response:
    app: App = request.app[APP_KEY]
    ctx = await authorize(request, "delete")
    record = await _file(app, ctx.namespace, request.match_info["id"])
    await _run(app.store.delete, ctx.namespace, record["id"])
    return json_response({"id": record["id"], "object": "file", "deleted": True})


# ---------------------------------------------------------------------------- jobs


async def _read_json(request: web.Request):
    try:
        return await request.json()
    except (ValueError, UnicodeDecodeError):
        raise bad_request("The request body is not valid JSON") from None


async def _base_model(app: App, ctx: Request, req: mapping.CreateRequest):
    """(base id, spec.model, spec defaults) for the request's model name."""
    if req.model.startswith(mapping.FT_PREFIX):
        ft = mapping.parse_ft_name(req.model)
        if ft.namespace != ctx.namespace:
            raise bad_request(
                f"model {req.model} belongs to namespace {ft.namespace}; jobs continue "
                f"jobs of their own namespace ({ctx.namespace})",
                "model",
                "model_not_found",
            )
        try:
            parent = await _run(ctx.caller.get, ctx.namespace, ft.job_id)
        except ApiError as exc:
            if exc.status != 404:
                raise
            raise bad_request(
                f"model {req.model}: no fine-tuning job {ft.job_id} in namespace {ctx.namespace}",
                "model",
                "model_not_found",
            ) from None
        if mapping.openai_status(parent) != "succeeded":
            raise bad_request(
                f"model {req.model} is not ready: job {ft.job_id} is "
                f"{mapping.openai_status(parent)}",
                "model",
                "model_not_ready",
            )
        base = mapping.request_of(parent).get("base") or ft.base
        model = mapping.parent_model(parent)
        if ft.checkpoint_step is not None:
            uri = mapping.checkpoint_uri(parent, ft.checkpoint_step)
            if uri is None:
                raise bad_request(
                    f"model {req.model}: job {ft.job_id} keeps no checkpoint at step "
                    f"{ft.checkpoint_step} (list them with .../checkpoints)",
                    "model",
                    "model_not_found",
                )
            model = {k: v for k, v in model.items() if k != "fromJob"}
            model |= {"fromCheckpoint": uri} | {
                k: v for k, v in app.settings.access().items() if k not in model
            }
        catalog = await _run(app.kube.catalog)
        defaults = catalog[base].spec if base in catalog else {}
        return base, model, defaults
    catalog = await _run(app.kube.catalog)
    entry = catalog.get(req.model)
    if entry is None:
        known = ", ".join(sorted(catalog)) or "none: the catalog is empty"
        raise bad_request(
            f"The model {req.model!r} does not exist in this cluster's catalog (available: "
            f"{known}), and is not an ft: name of a succeeded job",
            "model",
            "model_not_found",
        )
    return entry.id, entry.model, entry.spec


async def create_job(request: web.Request) -> web.Response:
    app: App = request.app[APP_KEY]
    ctx = await authorize(request, "create")
    req = mapping.parse_create(await _read_json(request))
    files = {}
    for param, fid in (
        ("training_file", req.training_file),
        ("validation_file", req.validation_file),
    ):
        if fid is None:
            continue
        record = await _run(app.store.get, ctx.namespace, fid)
        if record is None or _expired(record):
            raise bad_request(
                f"invalid {param}: no file {fid} in namespace {ctx.namespace}",
                param,
                "invalid_file",
            )
        files[fid] = record
    base, model, defaults = await _base_model(app, ctx, req)
    job = mapping.build_job(
        req,
        name=mapping.new_job_name(),
        namespace=ctx.namespace,
        settings=app.settings,
        files=files,
        base_id=base,
        model=model,
        defaults=defaults,
    )
    from kubetune_api.validation import validate_document

    result = validate_document(job)
    if not result.ok:
        raise bad_request(
            "The job this request maps to is not valid: "
            + "; ".join(str(e) for e in result.errors),
            None,
            "invalid_spec",
        )
    created = await _run(ctx.caller.create, ctx.namespace, job)
    log.info(
        "job %s created in namespace %s by %s",
        created["metadata"]["name"],
        ctx.namespace,
        ctx.identity.username,
    )
    return json_response(mapping.job_object(created))


async def list_jobs(request: web.Request) -> web.Response:
    ctx = await authorize(request, "list")
    q = request.query
    wanted = {}
    for key, value in q.items():
        if m := re.fullmatch(r"metadata\[(.+)\]", key):
            wanted[m.group(1)] = value
    limit = mapping.parse_limit(q.get("limit"), 20)
    jobs = await _run(ctx.caller.list, ctx.namespace)
    jobs = [j for j in mapping.newest_first(jobs) if mapping.matches_metadata(j, wanted)]
    # Only the page is turned into job objects (each resolves its spec).
    ids = [{"id": j["metadata"]["name"], "job": j} for j in jobs]
    out = mapping.page(ids, q.get("after"), limit)
    out["data"] = [mapping.job_object(i["job"]) for i in out["data"]]
    return json_response(out)


async def _job(ctx: Request, job_id: str) -> dict:
    name = mapping.job_name(job_id)
    try:
        return await _run(ctx.caller.get, ctx.namespace, name)
    except ApiError as exc:
        if exc.status == 404:
            raise not_found(
                f"No fine-tuning job found with id {job_id!r}", "fine_tuning_job_id"
            ) from None
        raise


async def _metrics(app: App, job: dict) -> list[dict]:
    prefix = mapping.job_prefix(app.settings, job)
    if prefix is None:
        return []
    try:
        return await _run(app.store.metrics, prefix)
    except Exception as exc:  # noqa: BLE001 - a slow or broken store leaves out metrics only
        log.warning("metrics of %s: %s", job["metadata"]["name"], type(exc).__name__)
        return []


def _trained_tokens(rows: list[dict]) -> Optional[int]:
    tokens = [r["tokens"] for r in rows if isinstance(r.get("tokens"), int)]
    return tokens[-1] if tokens else None


async def retrieve_job(request: web.Request) -> web.Response:
    app: App = request.app[APP_KEY]
    ctx = await authorize(request, "get")
    job = await _job(ctx, request.match_info["id"])
    tokens = None
    if mapping.openai_status(job) == "succeeded":
        tokens = _trained_tokens(await _metrics(app, job))
    return json_response(mapping.job_object(job, tokens))


async def _set_suspend(request: web.Request, action: str) -> web.Response:
    ctx = await authorize(request, "patch")
    job = await _job(ctx, request.match_info["id"])
    state = mapping.openai_status(job)
    name = job["metadata"]["name"]
    if action == "cancel":
        if state in mapping.TERMINAL:
            raise bad_request(
                f"Job {name} has already {state}: it cannot be cancelled", None, "job_finished"
            )
        patch = {
            "metadata": {"annotations": {mapping.ANN_CANCELLED: mapping.rfc3339(time.time())}},
            "spec": {"suspend": True},
        }
    elif action == "pause":
        if state in mapping.TERMINAL:
            raise bad_request(
                f"Job {name} has {state}: only a job that has not finished can be paused",
                None,
                "job_finished",
            )
        patch = {"spec": {"suspend": True}}
    else:
        if state in mapping.TERMINAL:
            raise bad_request(f"Job {name} has {state}: it cannot be resumed", None, "job_finished")
        patch = {"spec": {"suspend": False}}
    job = await _run(ctx.caller.patch, ctx.namespace, name, patch)
    log.info("job %s: %s by %s", name, action, ctx.identity.username)
    return json_response(mapping.job_object(job))


async def cancel_job(request):
    return await _set_suspend(request, "cancel")


async def pause_job(request):
    return await _set_suspend(request, "pause")


async def resume_job(request):
    return await _set_suspend(request, "resume")


async def job_events(request: web.Request) -> web.Response:
    app: App = request.app[APP_KEY]
    ctx = await authorize(request, "get")
    job = await _job(ctx, request.match_info["id"])
    kube_events, rows = await asyncio.gather(
        _run(ctx.caller.events, ctx.namespace, job["metadata"]["name"]), _metrics(app, job)
    )
    events = mapping.job_events(job, kube_events, rows)
    limit = mapping.parse_limit(request.query.get("limit"), 20)
    return json_response(mapping.page(events, request.query.get("after"), limit))


async def job_checkpoints(request: web.Request) -> web.Response:
    app: App = request.app[APP_KEY]
    ctx = await authorize(request, "get")
    job = await _job(ctx, request.match_info["id"])
    checkpoints = mapping.job_checkpoints(job, await _metrics(app, job))
    limit = mapping.parse_limit(request.query.get("limit"), 10)
    return json_response(mapping.page(checkpoints, request.query.get("after"), limit))


async def unsupported(request: web.Request) -> web.Response:
    raise ApiError(
        404,
        f"{request.method} {request.path} is not supported by kubetune's API: checkpoint "
        "permissions (sharing across organizations) and graders have no counterpart on a "
        "cluster (see docs/openai-compatible.md)",
        code="unsupported",
    )


async def healthz(_request: web.Request) -> web.Response:
    return web.json_response({"ok": True})


def make_app(state: App) -> web.Application:
    # Uploads stream to a temporary file (create_file checks the size itself).
    app = web.Application(middlewares=[errors], client_max_size=state.max_upload_bytes + CHUNK)
    app[APP_KEY] = state
    jobs = "/v1/fine_tuning/jobs"
    app.add_routes(
        [
            web.get("/healthz", healthz),
            web.post("/v1/files", create_file),
            web.get("/v1/files", list_files),
            web.get("/v1/files/{id}", retrieve_file),
            web.delete("/v1/files/{id}", delete_file),
            web.get("/v1/files/{id}/content", file_content),
            web.post(jobs, create_job),
            web.get(jobs, list_jobs),
            web.get(jobs + "/{id}", retrieve_job),
            web.post(jobs + "/{id}/cancel", cancel_job),
            web.post(jobs + "/{id}/pause", pause_job),
            web.post(jobs + "/{id}/resume", resume_job),
            web.get(jobs + "/{id}/events", job_events),
            web.get(jobs + "/{id}/checkpoints", job_checkpoints),
            web.route("*", "/v1/fine_tuning/checkpoints/{tail:.*}", unsupported),
            web.route("*", "/v1/fine_tuning/alpha/{tail:.*}", unsupported),
        ]
    )
    return app
