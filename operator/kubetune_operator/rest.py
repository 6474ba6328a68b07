"""JSON in, dicts out: the operator's Kubernetes calls over the kubernetes
client's `ApiClient` (its configuration, authentication, TLS and connection
pool) without the client's typed API classes.

Why: in kubernetes 37, `CoreV1Api` and `NetworkingV1Api` import their
pydantic models when first touched; measured in the operator process, that
is ~80 MiB resident (`CustomObjectsApi` another ~11 MiB), more than the
operator holds for 1,000 FineTuneJobs. The operator reads and writes a handful
of object kinds as plain dicts, so it builds the paths itself.
"""

from __future__ import annotations

import json
from typing import Any, Optional
from urllib.parse import quote

from kubernetes.client import ApiClient
from kubernetes.client.exceptions import ApiException

Body = dict[str, Any]

MERGE_PATCH = "application/merge-patch+json"


def core_path(ns: str, plural: str, name: Optional[str] = None) -> str:
    """A core (v1) namespaced resource, e.g. configmaps, secrets, pods."""
    return _path("/api/v1", ns, plural, name)


def group_path(group: str, version: str, ns: str, plural: str, name: Optional[str] = None) -> str:
    """A namespaced resource of an API group (custom resources included)."""
    return _path(f"/apis/{group}/{version}", ns, plural, name)


def _path(prefix: str, ns: str, plural: str, name: Optional[str]) -> str:
    path = f"{prefix}/namespaces/{quote(ns, safe='')}/{plural}"
    return f"{path}/{quote(name, safe='')}" if name is not None else path


class Rest:
    def __init__(self, api_client: ApiClient):
        self.api_client = api_client

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        query: Optional[dict[str, Any]] = None,
        content_type: str = "application/json",
        timeout: Any = None,
    ) -> Body:
        """One call; the answer's JSON as a dict. A non-2xx answer raises the
        client's ApiException (its `status` and `body`), as the typed calls do."""
        headers = {"Accept": "application/json"}
        if body is not None:
            headers["Content-Type"] = content_type
        method, url, headers, body, _ = self.api_client.param_serialize(
            method,
            path,
            query_params=[(k, v) for k, v in (query or {}).items() if v is not None],
            header_params=headers,
            body=body,
            auth_settings=["BearerToken"],
        )
        resp = self.api_client.call_api(method, url, headers, body, _request_timeout=timeout)
        data = resp.read()
        if not 200 <= resp.status <= 299:
            ApiException.from_response(
                http_resp=resp, body=data.decode("utf-8", "replace"), data=None
            )  # raises
        return json.loads(data) if data else {}

    # The part of CustomObjectsApi that leader.py calls, with its signatures.
    def get_namespaced_custom_object(self, group, version, ns, plural, name, _request_timeout=None):
        return self.request(
            "GET", group_path(group, version, ns, plural, name), timeout=_request_timeout
        )

    def create_namespaced_custom_object(
        self, group, version, ns, plural, body, _request_timeout=None
    ):
        return self.request(
            "POST", group_path(group, version, ns, plural), body, timeout=_request_timeout
        )

    def replace_namespaced_custom_object(
        self, group, version, ns, plural, name, body, _request_timeout=None
    ):
        return self.request(
            "PUT", group_path(group, version, ns, plural, name), body, timeout=_request_timeout
        )
