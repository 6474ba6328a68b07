"""Where the operator may read a job's storage with its own identity.

A job whose output names no `secretRef` is read with whatever credentials the
operator's pod holds (its cloud role, or AWS_* variables). Sent to a host the
job's author chose, those requests would be signed with the operator's
identity: a tenant could collect them, or point the operator at a store the
tenant cannot read. So a read without the job's own credentials goes only to
an endpoint on this allowlist (the chart's `storage.endpointAllowlist`,
KUBETUNE_STORAGE_ENDPOINT_ALLOWLIST); a job outside it ends `Failed` with
reason EndpointNotAllowed before anything is created.

An entry is `[scheme://]host[:port]`: no scheme means https, no port means the
scheme's default. In the host, `*` stands for exactly one DNS label, so
`s3.*.amazonaws.com` matches `s3.eu-west-1.amazonaws.com` and not
`x.s3.eu-west-1.amazonaws.com` nor `s3.evil.example.amazonaws.com`. A job
with no endpoint goes to its client's default (the public AWS S3 endpoints,
or whatever the operator's own AWS_ENDPOINT_URL says): the operator's choice,
always allowed.

Pure: no I/O.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional
from urllib.parse import urlsplit

from kubetune_api.validation import FieldError

from .names import Body

RULE = "EndpointNotAllowed"  # FieldError.rule, and the job's status.reason
ENV = "KUBETUNE_STORAGE_ENDPOINT_ALLOWLIST"

# The public endpoints of the stores the operator reads (s3://, through the S3
# API): AWS S3 (global, regional, dual-stack, FIPS, China) and Google Cloud
# Storage's S3-compatible XML API. Hosts only: virtual-hosted bucket names
# (BUCKET.s3.REGION.amazonaws.com) are what the client derives from an
# endpoint, never an endpoint a job needs to set.
DEFAULT_ALLOWLIST: tuple[str, ...] = (
    "s3.amazonaws.com",
    "s3.*.amazonaws.com",
    "s3.dualstack.*.amazonaws.com",
    "s3-fips.*.amazonaws.com",
    "s3-fips.dualstack.*.amazonaws.com",
    "s3.*.amazonaws.com.cn",
    "storage.googleapis.com",
)

_DEFAULT_PORTS = {"https": 443, "http": 80}
_LABEL = "[a-z0-9]([a-z0-9-]*[a-z0-9])?"


@dataclass(frozen=True)
class Entry:
    scheme: str
    host: re.Pattern
    port: int
    text: str

    def matches(self, scheme: str, host: str, port: int) -> bool:
        return scheme == self.scheme and port == self.port and self.host.fullmatch(host) is not None


def parse_entry(text: str) -> Entry:
    raw = text.strip()
    parts = urlsplit(raw if "://" in raw else "https://" + raw)
    scheme = parts.scheme.lower()
    if scheme not in _DEFAULT_PORTS or not parts.hostname or parts.path not in ("", "/"):
        raise ValueError(
            f"{ENV}: {text!r} is not [https://|http://]host[:port] (a `*` stands for one "
            "DNS label, e.g. s3.*.amazonaws.com)"
        )
    if parts.username or parts.password or parts.query or parts.fragment:
        raise ValueError(f"{ENV}: {text!r} must be a scheme, host and port only")
    host = parts.hostname.lower()
    labels = host.split(".")
    if any(not label for label in labels) or labels[-1] == "*":
        raise ValueError(f"{ENV}: {text!r}: a `*` may not be the top-level domain")
    pattern = r"\.".join(_LABEL if label == "*" else re.escape(label) for label in labels)
    return Entry(scheme, re.compile(pattern), parts.port or _DEFAULT_PORTS[scheme], raw)


@dataclass(frozen=True)
class Allowlist:
    entries: tuple[Entry, ...]

    @classmethod
    def parse(cls, items) -> Allowlist:
        return cls(tuple(parse_entry(i) for i in items if i.strip()))

    @classmethod
    def from_env(cls, value: Optional[str]) -> Allowlist:
        """Comma- or space-separated entries; unset means the default, empty means none."""
        if value is None:
            return cls.parse(DEFAULT_ALLOWLIST)
        return cls.parse(re.split(r"[,\s]+", value))

    def allows(self, endpoint: str) -> bool:
        try:
            parts = urlsplit(endpoint)
            scheme = parts.scheme.lower()
            host = (parts.hostname or "").lower().rstrip(".")
            port = parts.port or _DEFAULT_PORTS.get(scheme)
        except ValueError:  # a port out of range, a bracket missing
            return False
        if not host or port is None:
            return False
        return any(e.matches(scheme, host, port) for e in self.entries)

    def describe(self) -> str:
        return ", ".join(e.text for e in self.entries) or "(empty)"


def endpoint_problem(job: Body, allowlist: Allowlist) -> Optional[FieldError]:
    """Why the operator must not read this job's output with its own identity,
    or None (the job names its own credentials, or an allowed endpoint)."""
    output = (job.get("spec") or {}).get("output") or {}
    endpoint = output.get("endpoint")
    if not endpoint or (output.get("secretRef") or {}).get("name"):
        return None
    if allowlist.allows(endpoint):
        return None
    return FieldError(
        "spec.output.endpoint",
        f"{endpoint} is not on the operator's storage endpoint allowlist "
        f"({allowlist.describe()}; the chart's storage.endpointAllowlist) and the job names no "
        "spec.output.secretRef: the operator reads a job's storage with the job's own "
        "credentials, and with its own identity only from allowlisted endpoints",
        hint="put the store's keys in a Secret and name it in spec.output.secretRef, or ask "
        "the cluster's administrator to add the endpoint to storage.endpointAllowlist",
        rule=RULE,
    )
