"""The Kubernetes side: who the caller is (TokenReview), what they may do
(SubjectAccessReview), and acting as them: every FineTuneJob read or write goes
to the API server with the caller's own bearer token, so RBAC, quotas,
admission (CEL), Kueue and audit see the caller, never this server.

This server's own identity does only three things: TokenReview,
SubjectAccessReview, and reading the model catalog ConfigMap.
Blocking (the kubernetes client); the server calls it in worker threads.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Optional

from kubetune_api import models

from . import mapping
from .mapping import ApiError

log = logging.getLogger("kubetune.api")

REQUEST_TIMEOUT = 15
IDENTITY_TTL = 30.0  # seconds a TokenReview answer is reused
CALLERS_MAX = 256  # API clients kept for recent callers
SA_PREFIX = "system:serviceaccount:"
# All this server's own identity needs cluster-wide (the chart's ClusterRole;
# tests/unit/test_openai_chart.py holds the chart to it). Reading the catalog
# ConfigMap is a Role in the catalog's namespace.
SERVER_CLUSTER_RULES = {
    ("authentication.k8s.io", "tokenreviews"): {"create"},
    ("authorization.k8s.io", "subjectaccessreviews"): {"create"},
}


@dataclass
class Identity:
    username: str
    uid: str = ""
    groups: list[str] = field(default_factory=list)
    extra: dict[str, list[str]] = field(default_factory=dict)

    @property
    def service_account_namespace(self) -> Optional[str]:
        if self.username.startswith(SA_PREFIX):
            return self.username[len(SA_PREFIX) :].split(":", 1)[0] or None
        return None


def token_key(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def load_config(kubeconfig: Optional[str] = None):
    from kubernetes import client, config

    cfg = client.Configuration()
    if kubeconfig or not os.environ.get("KUBERNETES_SERVICE_HOST"):
        config.load_kube_config(config_file=kubeconfig, client_configuration=cfg)
    else:
        config.load_incluster_config(client_configuration=cfg)
    return cfg


def _api_error(exc, action: str) -> ApiError:
    """A Kubernetes API answer as OpenAI's error object (the server's message kept:
    it says which rule or permission; it never holds a credential)."""
    try:
        body = json.loads(exc.body or "{}")
    except (TypeError, ValueError):
        body = {}
    message = body.get("message") or exc.reason or "no message"
    status = exc.status or 502
    if status == 403:
        return ApiError(403, f"{action}: {message}", code="forbidden")
    if status == 401:
        return ApiError(
            401, "The token was not accepted by the Kubernetes API", code="invalid_api_key"
        )
    if status == 404:
        return ApiError(404, f"{action}: {message}", code="not_found")
    if status == 409:
        return ApiError(409, f"{action}: {message}", code="conflict")
    if status in (400, 422):
        return ApiError(400, f"{action}: {message}", code="invalid_spec")
    if status == 429:
        return ApiError(429, f"{action}: {message}", code="rate_limited", type="rate_limit_error")
    return ApiError(502, f"{action}: the Kubernetes API answered {status}", type="server_error")


class Kube:
    def __init__(
        self, cfg, catalog_ref: Optional[str], token_audiences: Optional[list[str]] = None
    ):
        from kubernetes import client

        self.cfg = cfg
        self.own = client.ApiClient(cfg)
        self.catalog_ref = catalog_ref
        self.audiences = token_audiences or []
        self._identities: dict[str, tuple[float, Identity]] = {}
        self._callers: dict[str, Any] = {}
        self._lock = threading.Lock()
        self._catalog: tuple[float, dict] = (0.0, {})

    # ------------------------------------------------------------------ who

    def review(self, token: str) -> Identity:
        from kubernetes import client
        from kubernetes.client.rest import ApiException

        key = token_key(token)
        now = time.monotonic()
        with self._lock:
            hit = self._identities.get(key)
        if hit and hit[0] > now:
            return hit[1]
        spec = client.V1TokenReviewSpec(token=token, audiences=self.audiences or None)
        try:
            review = client.AuthenticationV1Api(self.own).create_token_review(
                client.V1TokenReview(spec=spec), _request_timeout=REQUEST_TIMEOUT
            )
        except ApiException as exc:
            raise _api_error(exc, "TokenReview") from None
        st = review.status
        if not st or not st.authenticated or not st.user:
            raise ApiError(
                401,
                "Incorrect API key provided: use a Kubernetes token (a ServiceAccount token or "
                "your cluster login's) as the API key",
                code="invalid_api_key",
            )
        ident = Identity(
            st.user.username or "",
            st.user.uid or "",
            list(st.user.groups or []),
            dict(st.user.extra or {}),
        )
        with self._lock:
            if len(self._identities) > CALLERS_MAX:
                self._identities.clear()
            self._identities[key] = (now + IDENTITY_TTL, ident)
        return ident

    def allowed(self, ident: Identity, namespace: str, verb: str) -> tuple[bool, str]:
        from kubernetes import client
        from kubernetes.client.rest import ApiException

        attrs = client.V1ResourceAttributes(
            namespace=namespace, verb=verb, group=models.GROUP, resource=models.PLURAL
        )
        spec = client.V1SubjectAccessReviewSpec(
            user=ident.username,
            uid=ident.uid or None,
            groups=ident.groups or None,
            extra=ident.extra or None,
            resource_attributes=attrs,
        )
        try:
            sar = client.AuthorizationV1Api(self.own).create_subject_access_review(
                client.V1SubjectAccessReview(spec=spec), _request_timeout=REQUEST_TIMEOUT
            )
        except ApiException as exc:
            raise _api_error(exc, "SubjectAccessReview") from None
        return bool(sar.status and sar.status.allowed), (
            sar.status.reason or ""
        ) if sar.status else ""

    # ------------------------------------------------------------------ catalog

    def catalog(self) -> dict[str, mapping.CatalogEntry]:
        import yaml
        from kubernetes import client
        from kubernetes.client.rest import ApiException

        if not self.catalog_ref:
            return {}
        now = time.monotonic()
        with self._lock:
            until, cached = self._catalog
        if until > now:
            return cached
        ns, _, name = self.catalog_ref.partition("/")
        try:
            cm = client.CoreV1Api(self.own).read_namespaced_config_map(
                name, ns, _request_timeout=REQUEST_TIMEOUT
            )
        except ApiException as exc:
            log.error("model catalog ConfigMap %s: %s %s", self.catalog_ref, exc.status, exc.reason)
            raise ApiError(
                500, f"the model catalog ({self.catalog_ref}) cannot be read", type="server_error"
            ) from None
        raw = (cm.data or {}).get(mapping.CATALOG_KEY, "models: []")
        try:
            entries = mapping.parse_catalog(yaml.safe_load(raw), f"ConfigMap {self.catalog_ref}")
        except (ValueError, yaml.YAMLError) as exc:
            log.error("model catalog: %s", exc)
            raise ApiError(
                500, f"the model catalog is invalid: {exc}", type="server_error"
            ) from None
        with self._lock:
            self._catalog = (now + 10.0, entries)
        return entries

    # ------------------------------------------------------------------ as the caller

    def caller(self, token: str) -> Caller:
        from kubernetes import client

        key = token_key(token)
        with self._lock:
            api = self._callers.get(key)
            if api is None:
                cfg = client.Configuration()
                cfg.host = self.cfg.host
                cfg.ssl_ca_cert = self.cfg.ssl_ca_cert
                cfg.verify_ssl = self.cfg.verify_ssl
                cfg.tls_server_name = getattr(self.cfg, "tls_server_name", None)
                cfg.api_key = {"BearerToken": f"Bearer {token}"}
                api = client.ApiClient(cfg)
                if len(self._callers) >= CALLERS_MAX:
                    for old in list(self._callers)[: CALLERS_MAX // 2]:
                        self._callers.pop(old).close()
                self._callers[key] = api
        return Caller(api)


class Caller:
    """FineTuneJobs and their events, read and written with the caller's token."""

    def __init__(self, api):
        from kubernetes import client

        self.objects = client.CustomObjectsApi(api)
        self.core = client.CoreV1Api(api)

    def _call(self, action: str, fn, *args, **kwargs):
        from kubernetes.client.rest import ApiException

        try:
            return fn(*args, _request_timeout=REQUEST_TIMEOUT, **kwargs)
        except ApiException as exc:
            raise _api_error(exc, action) from None

    def create(self, namespace: str, body: dict) -> dict:
        return self._call(
            f"create FineTuneJob in namespace {namespace}",
            self.objects.create_namespaced_custom_object,
            models.GROUP,
            models.VERSION,
            namespace,
            models.PLURAL,
            body,
        )

    def get(self, namespace: str, name: str) -> dict:
        return self._call(
            f"FineTuneJob {name}",
            self.objects.get_namespaced_custom_object,
            models.GROUP,
            models.VERSION,
            namespace,
            models.PLURAL,
            name,
        )

    def list(self, namespace: str) -> list[dict]:
        out = self._call(
            f"list FineTuneJobs in namespace {namespace}",
            self.objects.list_namespaced_custom_object,
            models.GROUP,
            models.VERSION,
            namespace,
            models.PLURAL,
            label_selector=mapping.LABEL_API,
        )
        return out.get("items") or []

    def patch(self, namespace: str, name: str, patch: dict) -> dict:
        return self._call(
            f"update FineTuneJob {name}",
            self.objects.patch_namespaced_custom_object,
            models.GROUP,
            models.VERSION,
            namespace,
            models.PLURAL,
            name,
            patch,
        )

    def events(self, namespace: str, name: str) -> list[dict]:
        """The job's Kubernetes events; none when the caller may not list events."""
        from kubernetes.client.rest import ApiException

        try:
            out = self.core.list_namespaced_event(
                namespace,
                field_selector=f"involvedObject.name={name},involvedObject.kind={models.KIND}",
                _request_timeout=REQUEST_TIMEOUT,
                _preload_content=False,
            )
        except ApiException as exc:
            if exc.status in (401, 403):
                return []
            raise _api_error(exc, f"events of {name}") from None
        return json.loads(out.data).get("items") or []
