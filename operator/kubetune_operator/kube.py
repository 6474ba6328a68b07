"""The Kubernetes API, as the operator uses it: every call the reconcile makes
(the FineTuneJob and its status, its ConfigMap, guards and RayJob, the Kueue
LocalQueue, the Ray pods, a job's Secret), the exceptions they raise, and the
thread pool they run in. Blocking calls, run off the event loop by `call`;
decisions live elsewhere (reconciler.py and the pure modules).
"""

from __future__ import annotations

import asyncio
import base64
import json
from concurrent.futures import ThreadPoolExecutor
from typing import Optional

from kubernetes.client import ApiClient
from kubernetes.client.exceptions import ApiException

from kubetune_api import models

from . import metrics, ownership, pods
from .names import LABEL_ATTEMPT, LABEL_JOB_UID, Body
from .rest import MERGE_PATCH, Rest, core_path, group_path

RAY_GROUP, RAY_VERSION, RAY_PLURAL = "ray.io", "v1", "rayjobs"
KUEUE_GROUP, KUEUE_VERSION = "kueue.x-k8s.io", "v1beta1"

API_THREADS = 16
_API_POOL = ThreadPoolExecutor(max_workers=API_THREADS, thread_name_prefix="kubetune-api")


async def call(fn, *args):
    """One blocking call (an `Api` method) in the API pool, counted by name."""
    metrics.API_CALLS.labels(call=fn.__name__).inc()
    return await asyncio.get_running_loop().run_in_executor(_API_POOL, fn, *args)


def _created(rest: Rest, path: str, body: Body) -> bool:
    """Create-if-absent: whether this call created it (False: one of that name exists,
    409; the caller reads it to check whose it is)."""
    try:
        rest.request("POST", path, body)
        return True
    except ApiException as exc:
        if exc.status != 409:
            raise
        return False


class KubeRayMissing(Exception):
    """The ray.io/v1 RayJob API is not served: KubeRay's CRDs are not installed."""


class StaleStatus(Exception):
    """The FineTuneJob changed since the version this reconcile read: its status
    write was refused (409), nothing after it ran, and the job is read again."""


class Api:
    """The few Kubernetes calls the operator makes (blocking; run in threads),
    as plain dicts (rest.py says why not the client's typed API classes)."""

    def __init__(self, api_client: ApiClient):
        self.rest = Rest(api_client)

    # FineTuneJob
    def get_job(self, ns: str, name: str) -> Optional[Body]:
        try:
            return self.rest.request(
                "GET", group_path(models.GROUP, models.VERSION, ns, models.PLURAL, name)
            )
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    def patch_job_status(
        self, ns: str, name: str, status: dict, resource_version: Optional[str] = None
    ) -> Optional[Body]:
        """A merge patch of the status; with `resource_version`, the API server
        refuses it (409 Conflict) when the job has changed since that version:
        StaleStatus."""
        body: dict = {"status": status}
        if resource_version:
            body["metadata"] = {"resourceVersion": resource_version}
        try:
            path = group_path(models.GROUP, models.VERSION, ns, models.PLURAL, name)
            return self.rest.request("PATCH", f"{path}/status", body, content_type=MERGE_PATCH)
        except ApiException as exc:
            if exc.status == 409:
                metrics.STATUS_CONFLICTS.inc()
                raise StaleStatus(resource_version) from None
            raise

    # ConfigMap
    def ensure_configmap(self, cm: Body, job: Body, fresh: bool = False) -> None:
        """Create-if-absent; a retry's attempt annotation and config are patched in.
        `fresh`: most likely absent, so try the create first. Raises ChildConflict
        for a ConfigMap of that name that is not the job's (left untouched)."""
        ns, name = cm["metadata"]["namespace"], cm["metadata"]["name"]
        if fresh and _created(self.rest, core_path(ns, "configmaps"), cm):
            return
        try:
            live = self.rest.request("GET", core_path(ns, "configmaps", name))
        except ApiException as exc:
            if exc.status != 404:
                raise
            _created(self.rest, core_path(ns, "configmaps"), cm)
            return
        ownership.check("ConfigMap", ns, name, live["metadata"], job)
        want_attempt = cm["metadata"]["annotations"][LABEL_ATTEMPT]
        have_attempt = (live["metadata"].get("annotations") or {}).get(LABEL_ATTEMPT)
        if have_attempt != want_attempt:  # a retry: the config carries the attempt
            self.rest.request(
                "PATCH",
                core_path(ns, "configmaps", name),
                {"metadata": {"annotations": cm["metadata"]["annotations"]}, "data": cm["data"]},
                content_type=MERGE_PATCH,
            )

    def ensure_children(self, cm: Body, job: Body, guards: list[Body], fresh: bool) -> None:
        self.ensure_guards(guards, job)
        self.ensure_configmap(cm, job, fresh)

    def ensure_guards(self, objs: list[Body], job: Body) -> None:
        """Create-if-absent the token Secret and NetworkPolicy; one of the job's
        that exists is left alone (the token never changes under running pods).
        Raises ChildConflict for one of that name that is not the job's: a token
        someone else chose, or their policy, would open the job's Ray cluster."""
        for obj in objs:
            ns, name = obj["metadata"]["namespace"], obj["metadata"]["name"]
            if obj["kind"] == "Secret":
                path = core_path(ns, "secrets")
            else:
                path = group_path("networking.k8s.io", "v1", ns, "networkpolicies")
            if _created(self.rest, path, obj):
                continue
            live = self.rest.request("GET", f"{path}/{name}")
            ownership.check(obj["kind"], ns, name, live["metadata"], job)

    def delete_configmap(self, ns: str, name: str, job: Body) -> None:
        """Only the job's own: a ConfigMap of that name that someone else made is
        never deleted (the uid precondition also covers one re-created since)."""
        try:
            path = core_path(ns, "configmaps", name)
            live = self.rest.request("GET", path)
            if ownership.owner_of(live["metadata"], job) is not ownership.Owner.OURS:
                return
            self.rest.request("DELETE", path, {"preconditions": {"uid": live["metadata"]["uid"]}})
        except ApiException as exc:
            if exc.status not in (404, 409):
                raise

    # RayJob
    def get_rayjob(self, ns: str, name: str) -> Optional[Body]:
        try:
            return self.rest.request(
                "GET", group_path(RAY_GROUP, RAY_VERSION, ns, RAY_PLURAL, name)
            )
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    def create_rayjob(self, rayjob: Body, job: Body) -> tuple[Body, bool]:
        """(the RayJob, whether this call created it). Raises ChildConflict for a
        RayJob of that name that is not the job's."""
        ns, name = rayjob["metadata"]["namespace"], rayjob["metadata"]["name"]
        try:
            made = self.rest.request(
                "POST", group_path(RAY_GROUP, RAY_VERSION, ns, RAY_PLURAL), rayjob
            )
            return made, True
        except ApiException as exc:
            if exc.status == 409:  # made by an earlier run of this operator, or not ours
                live = self.get_rayjob(ns, name)
                if live is not None:
                    ownership.check("RayJob", ns, name, live["metadata"], job)
                return live, False
            if exc.status == 404:  # the namespace exists (the job is in it): no such API
                raise KubeRayMissing(str(exc.reason)) from exc
            raise

    def list_rayjobs(self, ns: str, job_uid: str) -> list[Body]:
        """The RayJobs labelled with the job's uid (ownership is checked by the caller)."""
        return self.rest.request(
            "GET",
            group_path(RAY_GROUP, RAY_VERSION, ns, RAY_PLURAL),
            query={"labelSelector": f"{LABEL_JOB_UID}={job_uid}"},
        ).get("items", [])

    def patch_rayjob(self, ns: str, name: str, patch: dict) -> Body:
        return self.rest.request(
            "PATCH",
            group_path(RAY_GROUP, RAY_VERSION, ns, RAY_PLURAL, name),
            patch,
            content_type=MERGE_PATCH,
        )

    def delete_rayjob(self, ns: str, name: str, job: Body) -> None:
        """Only the job's own: a RayJob of that name that someone else made is
        never deleted (the uid precondition also covers one re-created since)."""
        try:
            live = self.get_rayjob(ns, name)
            if not ownership.owned(live, job):
                return
            self.rest.request(
                "DELETE",
                group_path(RAY_GROUP, RAY_VERSION, ns, RAY_PLURAL, name),
                {
                    "propagationPolicy": "Background",
                    "preconditions": {"uid": live["metadata"]["uid"]},
                },
            )
        except ApiException as exc:
            if exc.status not in (404, 409):
                raise

    def local_queue(self, ns: str, name: str) -> str:
        """ "found", "missing" (no such LocalQueue), "no-api" (Kueue not installed)
        or "unknown" (say nothing: e.g. RBAC forbids the look-up)."""
        try:
            self.rest.request(
                "GET", group_path(KUEUE_GROUP, KUEUE_VERSION, ns, "localqueues", name)
            )
            return "found"
        except ApiException as exc:
            if exc.status != 404:
                return "unknown"
            try:
                details = json.loads(exc.body or "{}").get("details") or {}
            except ValueError:
                details = {}
            # A 404 for a missing object names it; one for a missing API does not.
            return "missing" if details.get("name") == name else "no-api"

    def list_pending_pods(self, ns: str, selector: str) -> Optional[list[Body]]:
        """One page (at most pods.POD_LIST_LIMIT) of the Pending pods that match
        `selector`, as plain dicts; None when the look-up is not allowed (say
        nothing: e.g. an RBAC without pods list)."""
        return self.list_ray_pods(ns, selector, pending_only=True)

    def list_ray_pods(
        self, ns: str, selector: str, pending_only: bool = False
    ) -> Optional[list[Body]]:
        """One page (at most pods.POD_LIST_LIMIT) of the pods that match
        `selector` (only the Pending ones if asked), as plain dicts; None when
        the look-up is not allowed."""
        query = {"labelSelector": selector, "limit": pods.POD_LIST_LIMIT}
        if pending_only:
            query["fieldSelector"] = pods.PENDING_PODS
        try:
            found = self.rest.request("GET", core_path(ns, "pods"), query=query)
        except ApiException as exc:
            if exc.status in (401, 403):
                return None
            raise
        return found.get("items") or []

    def read_secret(self, ns: str, name: str) -> dict[str, str]:
        secret = self.rest.request("GET", core_path(ns, "secrets", name))
        return {k: base64.b64decode(v).decode() for k, v in (secret.get("data") or {}).items()}
