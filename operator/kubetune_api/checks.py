"""Checks on single fields, each enforced twice from one definition.

A `Check` sits in a field's `Annotated[...]` metadata. The CRD generator turns
it into an `x-kubernetes-validations` entry (CEL, run by the API server) and
pydantic runs its Python predicate, so `kubectl apply` and `kubetune validate`
refuse the same values with the same message.

The Kubernetes formats below are the ones Pod creation enforces (see
k8s.io/apimachinery/pkg/util/validation and ValidateTolerations in
k8s.io/kubernetes/pkg/apis/core/validation): a FineTuneJob that passes them
cannot be refused later, when KubeRay creates its pods. The regular expressions
are written in the subset that Python's `re` and RE2 (CEL's `matches`) read
the same way: no lookarounds, no `\\w`, no `\\d`, anchored with ^ and $ and
matched in Python with `fullmatch`.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Optional

from pydantic import BaseModel, GetCoreSchemaHandler, GetJsonSchemaHandler
from pydantic_core import PydanticCustomError, core_schema

CHECK_ERROR = "kubetune_check"


@dataclass(frozen=True)
class Check:
    """One rule on one value: `cel` for the API server, `python` for the CLI.

    `python` sees what CEL sees: a plain value, or a camelCase dict for an
    object. `field` names the member the message is about (CEL's fieldPath).
    """

    cel: str
    message: str
    python: Callable[[Any], bool]
    field: Optional[str] = None

    def __get_pydantic_core_schema__(self, source: Any, handler: GetCoreSchemaHandler):
        inner = handler(source)

        def check(value: Any) -> Any:
            plain = value.to_dict() if isinstance(value, BaseModel) else value
            if not self.python(plain):
                ctx = {"field": self.field} if self.field else None
                raise PydanticCustomError(CHECK_ERROR, self.message, ctx)
            return value

        return core_schema.no_info_after_validator_function(check, inner)

    def __get_pydantic_json_schema__(self, schema: Any, handler: GetJsonSchemaHandler):
        out = handler(schema)
        entry = {"rule": self.cel, "message": self.message}
        if self.field:
            entry["fieldPath"] = "." + self.field
        out.setdefault("x-kubernetes-validations", []).append(entry)
        return out

    def __hash__(self) -> int:  # pydantic hashes metadata; the predicate is enough
        return hash((self.cel, self.message, self.field))


def _fullmatch(pattern: str) -> Callable[[str], bool]:
    # The CEL side anchors with ^...$; strip them for fullmatch.
    compiled = re.compile(pattern.removeprefix("^").removesuffix("$"))
    return lambda v: isinstance(v, str) and compiled.fullmatch(v) is not None


def _prefix(pattern: str) -> Callable[[str], bool]:
    compiled = re.compile(pattern.removeprefix("^"))
    return lambda v: isinstance(v, str) and compiled.match(v) is not None


def _cel_str(text: str) -> str:
    """A CEL raw string literal holding `text` (a regular expression)."""
    assert "'" not in text
    return f"r'{text}'"


# ---------------------------------------------------------------------------- characters

# C0 and C1 control characters, DEL, and the bidirectional embeddings, overrides
# and isolates (U+202A-U+202E, U+2066-U+2069) that make text display as
# something other than what it is. The two spellings name the same set;
# `lines`: tab and line feed are allowed (multi-line text such as a prompt).


def _printable(lines: bool, message: str) -> Check:
    c0_py, c0_re2 = (
        ("\x00-\x08\x0b-\x1f", r"\x00-\x08\x0b-\x1f")
        if lines
        else (
            "\x00-\x1f",
            r"\x00-\x1f",
        )
    )
    hostile = re.compile(f"[{c0_py}\x7f-\x9f\u202a-\u202e\u2066-\u2069]")
    re2 = f"[{c0_re2}" + r"\x7f-\x{9f}\x{202a}-\x{202e}\x{2066}-\x{2069}]"
    return Check(
        cel=f"!self.matches({_cel_str(re2)})",
        message=message,
        python=lambda v: isinstance(v, str) and hostile.search(v) is None,
    )


PRINTABLE = _printable(
    False,
    "must not contain control characters or bidirectional-text overrides: "
    "retype the value in plain text",
)
PRINTABLE_LINES = _printable(
    True,
    "must not contain control characters (other than new lines and tabs) or "
    "bidirectional-text overrides: retype the value in plain text",
)

NOT_BLANK = Check(
    cel="!self.matches('^[ ]*$')",
    message="must not be empty or blank: give a value, or leave the field out",
    python=lambda v: isinstance(v, str) and v.strip(" ") != "",
)

NO_SPACE = Check(
    cel="!self.contains(' ')",
    message="must not contain spaces: remove them",
    python=lambda v: isinstance(v, str) and " " not in v,
)

# A Hugging Face repository id: an optional owner and '/', then a name; letters,
# digits, '-', '_' and '.', alphanumeric at both ends (what the Hub accepts).
_HF_PART = "[A-Za-z0-9]([A-Za-z0-9._-]*[A-Za-z0-9])?"
HF_REPO_ID_RE = f"^({_HF_PART}/)?{_HF_PART}$"


def hf_repo_id(example: str) -> Check:
    return Check(
        cel=f"self.matches({_cel_str(HF_REPO_ID_RE)})",
        message="must be a Hugging Face id: an optional owner and '/', then a name, of "
        f"letters, digits, '-', '_' and '.' (e.g. {example}); for files use uri",
        python=_fullmatch(HF_REPO_ID_RE),
    )


# ---------------------------------------------------------------------------- Kubernetes names

_DNS_LABEL = "[a-z0-9]([-a-z0-9]*[a-z0-9])?"
DNS_SUBDOMAIN_RE = rf"^{_DNS_LABEL}(\.{_DNS_LABEL})*$"
DNS_SUBDOMAIN_MAX = 253
DNS_LABEL_RE = rf"^{_DNS_LABEL}$"
DNS_LABEL_MAX = 63
# A qualified name: an optional DNS-subdomain prefix and '/', then at most 63
# characters of letters, digits, '-', '_' and '.', alphanumeric at both ends.
_QUALIFIED_NAME_PART = "[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?"
QUALIFIED_NAME_RE = rf"^({_DNS_LABEL}(\.{_DNS_LABEL})*/)?{_QUALIFIED_NAME_PART}$"
QUALIFIED_NAME_MAX = DNS_SUBDOMAIN_MAX + 1 + 63
LABEL_VALUE_RE = r"^(([A-Za-z0-9][-A-Za-z0-9_.]{0,61})?[A-Za-z0-9])?$"
LABEL_VALUE_MAX = 63

is_dns_subdomain = _fullmatch(DNS_SUBDOMAIN_RE)
is_dns_label = _fullmatch(DNS_LABEL_RE)
is_label_value = _fullmatch(LABEL_VALUE_RE)
_qualified = _fullmatch(QUALIFIED_NAME_RE)


def is_qualified_name(v: Any) -> bool:
    """A label or annotation key, a taint/toleration key: Kubernetes' IsQualifiedName."""
    return _qualified(v) and ("/" not in v or v.index("/") <= DNS_SUBDOMAIN_MAX)


_QUALIFIED_CEL = (
    f"self.matches({_cel_str(QUALIFIED_NAME_RE)}) && "
    f"(!self.contains('/') || self.indexOf('/') <= {DNS_SUBDOMAIN_MAX})"
)

_DNS_SUBDOMAIN_TEXT = (
    "lowercase letters, digits, '-' and '.', starting and ending with a letter or digit, "
    f"at most {DNS_SUBDOMAIN_MAX} characters"
)
_QUALIFIED_TEXT = (
    "an optional DNS prefix and '/', then at most 63 letters, digits, '-', '_' or '.', "
    "starting and ending with a letter or digit (e.g. nvidia.com/gpu.product)"
)
_LABEL_VALUE_TEXT = (
    "at most 63 letters, digits, '-', '_' or '.', starting and ending with a letter or digit"
)


def dns_subdomain(what: str, example: str) -> Check:
    return Check(
        cel=f"self.matches({_cel_str(DNS_SUBDOMAIN_RE)})",
        message=f"must be the name of a {what}: {_DNS_SUBDOMAIN_TEXT} (e.g. {example})",
        python=is_dns_subdomain,
    )


QUALIFIED_NAME = Check(
    cel=f"self == '' || ({_QUALIFIED_CEL})",
    message=f"must be a Kubernetes label key: {_QUALIFIED_TEXT}",
    python=lambda v: v == "" or is_qualified_name(v),
)

LABEL_VALUE = Check(
    cel=f"self.matches({_cel_str(LABEL_VALUE_RE)})",
    message=f"must be a Kubernetes label value: {_LABEL_VALUE_TEXT}, or empty",
    python=is_label_value,
)

NODE_SELECTOR = Check(
    cel="self.all(k, k.size() <= "
    f"{QUALIFIED_NAME_MAX} && k.matches({_cel_str(QUALIFIED_NAME_RE)}) && "
    f"(!k.contains('/') || k.indexOf('/') <= {DNS_SUBDOMAIN_MAX}))",
    message=f"every key must be a Kubernetes label key: {_QUALIFIED_TEXT}",
    python=lambda m: isinstance(m, dict) and all(is_qualified_name(k) for k in m),
)

# An extended resource (GPUs and other devices): a qualified name with a domain,
# outside kubernetes.io, as the device plugin registers it.
GPU_RESOURCE_NAME = Check(
    cel=f"self.matches({_cel_str(QUALIFIED_NAME_RE)}) && self.contains('/') && "
    f"self.indexOf('/') <= {DNS_SUBDOMAIN_MAX} && !self.contains('kubernetes.io/')",
    message="must be an extended resource name, a domain, '/' and a name, outside "
    "kubernetes.io (e.g. nvidia.com/gpu or amd.com/gpu)",
    python=lambda v: is_qualified_name(v) and "/" in v and "kubernetes.io/" not in v,
)

# ---------------------------------------------------------------------------- quantities

# On a value that already has a quantity's form (digits, an optional fraction and
# suffix: the field's pattern): zero in any spelling (0, 0.0, 0Gi, 000m).
_ZERO_QUANTITY_RE = r"^0+(\.0+)?[A-Za-z]*$"

POSITIVE_QUANTITY = Check(
    cel=f"!self.matches({_cel_str(_ZERO_QUANTITY_RE)})",
    message="must be more than zero: a pod with none of it cannot run the trainer; give "
    'an amount, e.g. "8" CPUs or "64Gi" of memory',
    python=lambda v: not (isinstance(v, str) and _fullmatch(_ZERO_QUANTITY_RE)(v)),
)

# Sizes in bytes below one byte: m is thousandths (128m is 0.128 bytes, always a slip
# for Mi), and a fraction without a unit is a fraction of a byte.
_SUB_BYTE_RE = "^([0-9]+([.][0-9]+)?m|[0-9]+[.][0-9]+)$"

BYTES_QUANTITY = Check(
    cel=f"!self.matches({_cel_str(_SUB_BYTE_RE)})",
    message="is a size in bytes: m means thousandths (128m is 0.128 bytes) and a number "
    'without a unit counts bytes: write Mi or Gi, e.g. "512Mi" or "64Gi"',
    python=lambda v: not (isinstance(v, str) and _fullmatch(_SUB_BYTE_RE)(v)),
)

# ---------------------------------------------------------------------------- images

# The reference grammar of container images (github.com/distribution/reference):
# what a kubelet can pull. Repository paths are lowercase; a tag is at most 128
# characters; a digest is algorithm:hex.
_ALNUM = "[a-z0-9]+"
_SEP = "([._]|__|[-]+)"
_PATH_COMPONENT = f"{_ALNUM}({_SEP}{_ALNUM})*"
_DOMAIN_COMPONENT = "([a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_DOMAIN = rf"({_DOMAIN_COMPONENT}(\.{_DOMAIN_COMPONENT})*|\[[a-fA-F0-9:]+\])(:[0-9]+)?"
_TAG = "[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}"
_DIGEST = "[A-Za-z][A-Za-z0-9]*([-_+.][A-Za-z][A-Za-z0-9]*)*:[0-9a-fA-F]{32,}"
IMAGE_RE = f"^({_DOMAIN}/)?{_PATH_COMPONENT}(/{_PATH_COMPONENT})*(:{_TAG})?(@{_DIGEST})?$"
IMAGE_MAX = 512

IMAGE = Check(
    cel=f"self.matches({_cel_str(IMAGE_RE)})",
    message="must be a container image reference without spaces: [registry/]repository"
    "[:tag][@sha256:digest], repository in lowercase "
    "(e.g. ghcr.io/kubetune/kubetune-trainer:0.1.0)",
    python=_fullmatch(IMAGE_RE),
)

# ---------------------------------------------------------------------------- URIs

URI_SCHEMES = ("s3", "gs", "gcs", "file", "hf")
_SCHEME_RE = "^[A-Za-z][A-Za-z0-9+.-]*://"
_USERINFO_RE = "^[A-Za-z][A-Za-z0-9+.-]*://[^/?#]*@"
_BUCKET_RE = "^(s3|gs|gcs)://([^/?#]*@)?[A-Za-z0-9._-]+(/.*)?$"
_schemes = "|".join(URI_SCHEMES)

NO_CREDENTIALS = Check(
    cel=f"!self.matches({_cel_str(_USERINFO_RE)})",
    message="must not carry credentials (user:password@): they would show in status, "
    "events and logs; put them in a Secret and name it in secretRef",
    python=lambda v: isinstance(v, str) and re.match(_USERINFO_RE, v) is None,
)

# Query parameters that carry a credential: presigned S3 and GCS URLs, Azure SAS
# signatures, bearer tokens and API keys. Matched by whole parameter name, any case.
QUERY_CREDENTIAL_NAMES = (
    "x-amz-credential",
    "x-amz-signature",
    "x-amz-security-token",
    "x-goog-credential",
    "x-goog-signature",
    "sig",
    "signature",
    "token",
    "access_token",
    "id_token",
    "refresh_token",
    "private_token",
    "key",
    "api_key",
    "apikey",
    "access_key",
    "accesskey",
    "secret",
    "secret_key",
    "client_secret",
    "password",
    "passwd",
    "pwd",
    "auth",
    "authorization",
    "credential",
    "credentials",
)
# In the query or in the fragment (an OAuth redirect's #access_token=, a single-page
# app's #/callback?token=): whatever follows the path shows in status as well.
_QUERY_CREDENTIAL_RE = (
    "^[^?#]*[?#](.*[?&#])?(?i:" + "|".join(QUERY_CREDENTIAL_NAMES).replace("-", "[-]") + ")="
)

NO_QUERY_CREDENTIALS = Check(
    cel=f"!self.matches({_cel_str(_QUERY_CREDENTIAL_RE)})",
    message="must not carry credentials in its query string or fragment (X-Amz-Signature=, "
    "sig=, token=, key=, ...: a presigned or tokened URL): they would show in status, events "
    "and logs; put the keys in a Secret and name it in secretRef",
    python=lambda v: isinstance(v, str) and re.match(_QUERY_CREDENTIAL_RE, v) is None,
)

STORAGE_SCHEME = Check(
    cel=f"!self.matches({_cel_str(_SCHEME_RE)}) || self.matches('^({_schemes})://')",
    message="unsupported URI scheme: use s3://, gs://, gcs://, file://, hf:// or a path "
    "on a mounted volume",
    python=lambda v: (
        isinstance(v, str)
        and (re.match(_SCHEME_RE, v) is None or re.match(f"({_schemes})://", v) is not None)
    ),
)

BUCKET = Check(
    cel=f"!self.matches('^(s3|gs|gcs)://') || self.matches({_cel_str(_BUCKET_RE)})",
    message="an object-store URI needs a bucket name, then /path: write s3://BUCKET/path "
    "(letters, digits, '.', '-' and '_' in the bucket name)",
    python=lambda v: (
        isinstance(v, str) and (re.match("(s3|gs|gcs)://", v) is None or _fullmatch(_BUCKET_RE)(v))
    ),
)

# Bucket names the stores create and serve. A URI with user:password@ is refused
# by NO_CREDENTIALS (one error, not two), and one with no bucket by BUCKET.
#
# S3 (AWS, and MinIO, Ceph and R2 alike): 3 to 63 characters; dot-separated parts
# of lowercase letters, digits and '-', each starting and ending with a letter or
# digit (so no leading, trailing or doubled '.', no '-.' or '.-'); not an IP address.
_S3_NAME = "[a-z0-9]([a-z0-9-]*[a-z0-9])?"
_S3_BUCKET_RULES = (
    (True, rf"^s3://{_S3_NAME}(\.{_S3_NAME})*(/.*)?$"),
    (True, "^s3://[^/]{3,63}(/.*)?$"),
    (False, r"^s3://[0-9]+\.[0-9]+\.[0-9]+\.[0-9]+(/.*)?$"),
)
# GCS: lowercase letters, digits, '-', '_' and '.', starting and ending with a letter or
# digit, no '..'; 3 to 63 characters, or up to 222 with dots and at most 63 between
# them; not an IP address; not starting with goog, not containing google.
_GCS_NAME = "[a-z0-9]([a-z0-9_-]*[a-z0-9])?"
_GCS_BUCKET_RULES = (
    (True, rf"^gc?s://{_GCS_NAME}(\.{_GCS_NAME})*(/.*)?$"),
    (True, "^gc?s://[^/]{3,222}(/.*)?$"),
    (False, "^gc?s://([^/]*[.])?[^/.]{64}"),
    (False, r"^gc?s://[0-9]+\.[0-9]+\.[0-9]+\.[0-9]+(/.*)?$"),
    (False, "^gc?s://(goog|[^/]*google)"),
)


def _bucket_check(scheme_re: str, rules: tuple[tuple[bool, str], ...], message: str) -> Check:
    skip = f"!self.matches('{scheme_re}') || self.matches({_cel_str(_USERINFO_RE)}) || "
    skip += f"!self.matches({_cel_str(_BUCKET_RE)})"
    cel = " && ".join(f"{'' if must else '!'}self.matches({_cel_str(rx)})" for must, rx in rules)
    # RE2's $ is the end of the text, Python's may sit before a final newline: fullmatch
    tests = [(must, _fullmatch(rx) if rx.endswith("$") else _prefix(rx)) for must, rx in rules]

    def python(v: Any) -> bool:
        if not isinstance(v, str) or re.match(scheme_re, v) is None:
            return True
        if re.match(_USERINFO_RE, v) or not _fullmatch(_BUCKET_RE)(v):
            return True
        return all(test(v) == must for must, test in tests)

    return Check(cel=f"{skip} || ({cel})", message=message, python=python)


S3_BUCKET = _bucket_check(
    "^s3://",
    _S3_BUCKET_RULES,
    "the bucket is not one S3 (or MinIO, Ceph, R2) can hold: 3 to 63 lowercase letters, "
    "digits, '.' and '-', each dot-separated part starting and ending with a letter or "
    "digit, not an IP address: rename it, e.g. s3://my-bucket/path",
)
GCS_BUCKET = _bucket_check(
    "^gc?s://",
    _GCS_BUCKET_RULES,
    "the bucket is not one Cloud Storage can hold: 3 to 63 lowercase letters, digits, '-', "
    "'_' and '.' (up to 222 with dots, 63 between them), starting and ending with a letter "
    "or digit, not an IP address, not starting with goog or containing google: rename "
    "it, e.g. gs://my-bucket/path",
)

ABSOLUTE_OUTPUT = Check(
    cel=f"self.matches({_cel_str(_SCHEME_RE)}) || self.startsWith('/')",
    message="a relative path is inside the pod and lost when it ends: use s3://, gs:// or "
    "an absolute path on a mounted volume (`kubetune run --output` takes local paths)",
    python=lambda v: (
        isinstance(v, str) and (re.match(_SCHEME_RE, v) is not None or v.startswith("/"))
    ),
)

ENDPOINT = Check(
    cel="self.matches('^https?://[^/?#@ ]+([/?#].*)?$')",
    message="must be an http:// or https:// URL with a host, e.g. https://minio.example:9000",
    python=_fullmatch("^https?://[^/?#@ ]+([/?#].*)?$"),
)

STORAGE_URI = (
    PRINTABLE,
    NOT_BLANK,
    NO_CREDENTIALS,
    NO_QUERY_CREDENTIALS,
    STORAGE_SCHEME,
    BUCKET,
    S3_BUCKET,
    GCS_BUCKET,
)

# ---------------------------------------------------------------------------- tolerations


def _set(obj: dict, key: str) -> bool:
    return obj.get(key) not in (None, "")


TOLERATION = (
    Check(
        cel="(has(self.key) && self.key != '') || (has(self.operator) && "
        "self.operator == 'Exists')",
        message="operator must be Exists when key is empty (that tolerates every taint): "
        "set key, or operator: Exists",
        python=lambda t: _set(t, "key") or t.get("operator") == "Exists",
        field="operator",
    ),
    Check(
        cel="!has(self.operator) || self.operator != 'Exists' || !has(self.value) || "
        "self.value == ''",
        message="value must be empty when operator is Exists: remove value, or use operator: Equal",
        python=lambda t: t.get("operator") != "Exists" or not _set(t, "value"),
        field="value",
    ),
    Check(
        cel="!has(self.tolerationSeconds) || (has(self.effect) && self.effect == 'NoExecute')",
        message="tolerationSeconds applies to effect NoExecute only: set effect: NoExecute, "
        "or remove tolerationSeconds",
        python=lambda t: t.get("tolerationSeconds") is None or t.get("effect") == "NoExecute",
        field="tolerationSeconds",
    ),
)
