"""Validate and resolve FineTuneJob documents, the way the API server would and
then some.

`validate_document` reports every problem at once (schema errors from pydantic
and broken cross-field rules), each with its field path and a hint at the fix.
`resolve_spec` then fills the defaults that depend on other fields, giving the
one resolved spec that the operator and the trainer both consume.
"""

from __future__ import annotations

import copy
import difflib
import json
import math
import re
from dataclasses import asdict, dataclass, field
from decimal import Decimal
from functools import lru_cache
from typing import Any, Optional, get_args

from pydantic import BaseModel, ValidationError

from . import checks, models, objectives, sweep_space
from .crd import spec_schema
from .rules import check_rules


@dataclass
class FieldError:
    path: str  # e.g. spec.hyperparameters.maxSteps
    message: str
    hint: Optional[str] = None
    rule: Optional[str] = None  # rule id for cross-field rules

    def __str__(self) -> str:
        text = f"{self.path}: {self.message}"
        return f"{text} (hint: {self.hint})" if self.hint else text

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}


@dataclass
class Result:
    errors: list[FieldError] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    job: Optional[models.FineTuneJob] = None

    @property
    def ok(self) -> bool:
        return not self.errors


class SpecError(ValueError):
    """A FineTuneJob that cannot run; `errors` says where and why."""

    def __init__(self, errors: list[FieldError]):
        self.errors = errors
        super().__init__("; ".join(str(e) for e in errors))


# ---------------------------------------------------------------------------- defaults


@lru_cache(maxsize=1)
def _schema() -> dict[str, Any]:
    return spec_schema()


def apply_defaults(spec: Any, schema: Optional[dict[str, Any]] = None) -> Any:
    """Structural defaulting as the API server does it: a missing property with
    a `default` gets it, recursively, inside objects that are present."""
    schema = _schema() if schema is None else schema
    if not isinstance(spec, dict):
        return spec
    out = copy.deepcopy(spec)
    for name, sub in schema.get("properties", {}).items():
        if name not in out and "default" in sub:
            out[name] = copy.deepcopy(sub["default"])
        if name in out:
            if isinstance(out[name], dict):
                out[name] = apply_defaults(out[name], sub)
            elif isinstance(out[name], list) and "items" in sub:
                out[name] = [apply_defaults(i, sub["items"]) for i in out[name]]
    return out


# ---------------------------------------------------------------------------- echo


def short(value: Any, limit: int = 60) -> str:
    """A value as an error may repeat it: quoted, control and bidi characters
    escaped, and cut to `limit` characters (a 1 MiB value is not echoed)."""
    if isinstance(value, str):
        text = repr(value)
    elif isinstance(value, (dict, list)):
        text = {dict: "a mapping", list: "a list"}[type(value)]
    else:
        text = repr(value)
    if len(text) <= limit:
        return text
    size = f"{len(value):,} characters" if isinstance(value, str) else f"{len(text):,} long"
    return f"{text[:limit]}… ({size})"


def _key(part: Any) -> str:
    """One field-path segment: plain when it is a plain name, else escaped and cut."""
    if isinstance(part, int):
        return f"[{part}]"
    text = str(part)
    if text.isidentifier() and len(text) <= 64:
        return "." + text
    if _PLAIN_KEY.fullmatch(text) and len(text) <= 64:
        return f"[{text}]"
    return f"[{short(text, 64)}]"


_PLAIN_KEY = re.compile(r"[A-Za-z0-9_./-]+")


def join_path(prefix: str, parts: tuple) -> str:
    return prefix + "".join(_key(p) for p in parts)


# ---------------------------------------------------------------------------- JSON, as sent

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


def _api_number(value: Any) -> Any:
    """A number as the API server decodes it from kubectl's JSON. go-yaml turns an
    integer outside int64 into a float; Go writes an integral float below 1e21
    without an exponent; the server reads digits that fit int64 as an integer
    and anything else as a float."""
    if isinstance(value, int) and not INT64_MIN <= value <= INT64_MAX:
        try:
            value = float(value)
        except OverflowError:
            return str(value)  # too big for a float: go-yaml keeps it as text
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e21:
        # Go writes the shortest digits that read back as the same float, padded
        # with zeros: -2**63 as a float becomes -9223372036854776000, not an int64.
        whole = int(Decimal(repr(value)))
        if INT64_MIN <= whole <= INT64_MAX:
            return whole
    return value


def prune_nulls(value: Any) -> Any:
    """The API server drops null fields of a structural schema before defaulting:
    `workers: null` means "use the default", as if it were absent."""
    if isinstance(value, dict):
        return {k: prune_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [prune_nulls(v) for v in value]
    return value


def _map_key(key: Any) -> Optional[str]:
    """sigs.k8s.io/yaml's conversion of a YAML map key to a JSON key."""
    if isinstance(key, bool):
        return "true" if key else "false"
    if isinstance(key, (str, int)):
        return str(key)
    if isinstance(key, float):
        return repr(int(key)) if key.is_integer() else repr(key)
    return None


def to_api_json(value: Any, path: str = "") -> tuple[Any, list[FieldError]]:
    """`value` as the API server would receive it, with an error for everything
    JSON cannot carry (NaN, infinities, keys that are not scalars)."""
    errors: list[FieldError] = []

    def walk(v: Any, where: str, depth: int) -> Any:
        if depth > 64:
            errors.append(FieldError(where or "(document)", "is nested too deeply", "flatten it"))
            return None
        if v is None or isinstance(v, (bool, str)):
            return v
        if isinstance(v, (int, float)):
            if isinstance(v, float) and not math.isfinite(v):
                errors.append(
                    FieldError(
                        where or "(document)",
                        f"{v!r} is not a number JSON can carry (NaN or infinity)",
                        "give a finite number",
                    )
                )
                return None
            return _api_number(v)
        if isinstance(v, dict):
            out = {}
            for k, sub in v.items():
                name = _map_key(k)
                if name is None:
                    errors.append(
                        FieldError(
                            f"{where or '(document)'}",
                            f"has a key that is not text: {short(k)}",
                            "use plain words as keys",
                        )
                    )
                    continue
                out[name] = walk(sub, f"{where}{_key(name)}".lstrip("."), depth + 1)
            return out
        if isinstance(v, (list, tuple)):
            return [walk(sub, f"{where}[{i}]", depth + 1) for i, sub in enumerate(v)]
        if isinstance(v, (set, frozenset)):
            return {_map_key(k) or str(k): None for k in v}
        if isinstance(v, bytes):
            return v.decode("utf-8", "replace")
        errors.append(
            FieldError(
                where or "(document)",
                f"{type(v).__name__} values cannot be sent to the API server",
                "write a string, number, boolean, list or mapping",
            )
        )
        return None

    return walk(value, path, 0), errors


# ---------------------------------------------------------------------------- errors


def _model_for_path(loc: tuple) -> Optional[type[BaseModel]]:
    """The pydantic model that owns the last element of a spec error location."""
    model: Any = models.FineTuneJobSpec
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        fields = {f.alias or n: f for n, f in model.model_fields.items()}
        f = fields.get(part)
        if f is None:
            return None
        nxt = _find_model(f.annotation)
        if nxt is None:
            return None
        model = nxt
    return model


def _find_model(ann: Any) -> Optional[type[BaseModel]]:
    if isinstance(ann, type) and issubclass(ann, BaseModel):
        return ann
    for inner in getattr(ann, "__args__", ()) or ():
        found = _find_model(inner)
        if found is not None:
            return found
    origin = getattr(ann, "__origin__", None)
    if origin is not None and origin is not ann:
        return _find_model(origin)
    return None


_TYPE_WORDS = {
    "int": ("must be a whole number", "write digits without quotes, e.g. 4"),
    "float": ("must be a number", "write digits without quotes, e.g. 0.5"),
    "bool": ("must be true or false", "write true or false without quotes"),
    "string": ("must be text", 'quote it, e.g. "8"'),
    "dict": ("must be a mapping of names to values", "write `key: value` lines under it"),
    "model": ("must be a mapping of fields", "write `field: value` lines under it"),
    "list": ("must be a list", "write `- item` lines under it"),
}


def _words(err: dict, loc: tuple) -> tuple[str, Optional[str]]:
    """A pydantic error in plain words: (message, hint)."""
    kind = err["type"]
    ctx = err.get("ctx") or {}
    value = err.get("input")
    if kind == "kubetune_check":
        return err["msg"], None
    if kind == "extra_forbidden":
        owner = _model_for_path(loc) if loc else None
        if owner is not None:
            known = [f.alias or n for n, f in owner.model_fields.items()]
            close = difflib.get_close_matches(str(loc[-1]), known, n=1)
            if close:
                return "unknown field", f"did you mean {close[0]}?"
            return "unknown field", "known fields here: " + ", ".join(known)
        return "unknown field", "remove it"
    if kind in ("literal_error", "enum"):
        expected = ctx.get("expected")
        return f"{short(value)} is not allowed", f"use one of {expected}" if expected else None
    if kind == "missing":
        return "is required", "add this field"
    if kind == "int_type" and isinstance(value, float):
        if value.is_integer():
            return (
                f"{value:.4g} is beyond the largest whole number the API server stores "
                f"({INT64_MAX})",
                "give a smaller number",
            )
        return f"{value!r} is not a whole number", "give a whole number, e.g. 4"
    if kind == "finite_number":
        return "must be a finite number (not NaN or infinity)", "give a number"
    bounds = {
        "greater_than": ("greater than", "gt"),
        "greater_than_equal": ("at least", "ge"),
        "less_than": ("less than", "lt"),
        "less_than_equal": ("at most", "le"),
    }
    if kind in bounds:
        words, key = bounds[kind]
        field = ".".join(str(p) for p in loc if isinstance(p, str))
        explain = f"see `kubectl explain ftj.spec.{field}`"
        return f"{short(value)} is out of range: must be {words} {ctx.get(key)}", explain
    if kind == "string_too_long":
        size = len(value) if isinstance(value, str) else "?"
        return (
            f"is {size} characters long: at most {ctx.get('max_length')}",
            "shorten it",
        )
    if kind == "string_too_short":
        return "must not be empty", "give a value, or leave the field out"
    if kind in ("too_long", "too_short"):
        words = "at most" if kind == "too_long" else "at least"
        bound = ctx.get("max_length") if kind == "too_long" else ctx.get("min_length")
        return f"has {ctx.get('actual_length')} entries: {words} {bound}", None
    if kind == "string_pattern_mismatch":
        return f"{short(value)} is not a Kubernetes quantity", (
            'write it as a quoted string like "500m", "8" or "16Gi"'
        )
    for prefix, (message, hint) in _TYPE_WORDS.items():
        if kind.startswith(prefix + "_") and kind.endswith(("_type", "_parsing")):
            return f"{message}, not {_kind_of(value)}", hint
    return err["msg"], None


def _kind_of(value: Any) -> str:
    if isinstance(value, bool):
        return f"the boolean {str(value).lower()}"
    if isinstance(value, (int, float)):
        return f"the number {short(value)}"
    if isinstance(value, str):
        return f"the text {short(value)}"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    return "null" if value is None else type(value).__name__


_UNION_TAG = re.compile(r"[\w-]*\[.*\]")


def _is_union_tag(part: str) -> bool:
    """pydantic names union branches in error locations (`function-after[...]`,
    `list[...]`, `int`); they are not fields."""
    return bool(_UNION_TAG.fullmatch(part)) or part in (
        "int", "str", "float", "bool", "constrained-int"
    )  # fmt: skip


_UNION_FIELDS = {"zeroStage": ("must be 0, 1, 2, 3 or auto", "e.g. zeroStage: 3")}


def _pydantic_errors(exc: ValidationError, prefix: str) -> list[FieldError]:
    out = []
    seen = set()
    for err in exc.errors():
        loc = tuple(err["loc"])
        # Union[Literal['auto'], int] reports once per branch: keep the first.
        # An unknown field's own name (the last part) is the user's, whatever it looks like.
        last = len(loc) - 1 if err["type"] == "extra_forbidden" else -1
        clean = tuple(
            p
            for i, p in enumerate(loc)
            if i == last or not (isinstance(p, str) and _is_union_tag(p))
        )
        field = (err.get("ctx") or {}).get("field") if err["type"] == "kubetune_check" else None
        path = join_path(prefix, clean + tuple(field.split(".")) if field else clean)
        if path in seen:
            continue
        seen.add(path)
        if clean and clean[-1] in _UNION_FIELDS and len(loc) > len(clean):
            msg, hint = _UNION_FIELDS[clean[-1]]
        else:
            msg, hint = _words(err, clean)
        out.append(FieldError(path, msg, hint))
    return out


# ---------------------------------------------------------------------------- metadata

_META_FIELDS = {
    "name",
    "generateName",
    "namespace",
    "labels",
    "annotations",
    "uid",
    "resourceVersion",
    "generation",
    "creationTimestamp",
    "deletionTimestamp",
    "deletionGracePeriodSeconds",
    "finalizers",
    "ownerReferences",
    "managedFields",
    "selfLink",
}
ANNOTATIONS_MAX_BYTES = 256 * 1024


def _string_map(meta: dict, key: str, errors: list[FieldError], values: bool) -> None:
    mapping = meta.get(key)
    if mapping is None:
        return
    where = f"metadata.{key}"
    if not isinstance(mapping, dict):
        errors.append(
            FieldError(
                where,
                f"must be a mapping, not {_kind_of(mapping)}",
                "write `key: value` lines under it",
            )
        )
        return
    for k, v in mapping.items():
        at = join_path(where, (k,))
        # Kubernetes lowercases annotation keys before checking them, not label keys.
        if not checks.is_qualified_name(k if values else k.lower()):
            errors.append(
                FieldError(
                    at,
                    f"{short(k)} is not a valid key: an optional DNS prefix and '/', then at "
                    "most 63 letters, digits, '-', '_' or '.', starting and ending with a "
                    "letter or digit",
                    "e.g. team or example.com/team",
                )
            )
        if not isinstance(v, str):
            errors.append(
                FieldError(
                    at,
                    f"must be text, not {_kind_of(v)}",
                    f'quote it: {k}: "{json.dumps(v)}"'
                    if isinstance(v, (int, float, bool)) and len(k) < 64
                    else "write it as quoted text",
                )
            )
        elif values and not checks.is_label_value(v):
            errors.append(
                FieldError(
                    at,
                    f"{short(v)} is not a valid label value: at most 63 letters, digits, "
                    "'-', '_' or '.', starting and ending with a letter or digit",
                    "shorten it or use an annotation for free text",
                )
            )
    if not values and all(isinstance(v, str) for v in mapping.values()):
        size = sum(len(k.encode()) + len(v.encode()) for k, v in mapping.items())
        if size > ANNOTATIONS_MAX_BYTES:
            errors.append(
                FieldError(
                    where,
                    f"total {size:,} bytes: at most 256 KiB",
                    "keep large data out of annotations",
                )
            )


def validate_metadata(meta: Any) -> list[FieldError]:
    """The metadata checks the API server makes on a FineTuneJob that kubectl applies."""
    errors: list[FieldError] = []
    if meta is None:
        meta = {}
    if not isinstance(meta, dict):
        return [
            FieldError(
                "metadata",
                f"must be a mapping, not {_kind_of(meta)}",
                "write `name: my-job` under metadata",
            )
        ]
    name = meta.get("name")
    if name is None or name == "":
        errors.append(FieldError("metadata.name", "is required", "name the job, e.g. my-job"))
    elif not isinstance(name, str):
        errors.append(
            FieldError(
                "metadata.name",
                f"must be text, not {_kind_of(name)}",
                "write one name, e.g. my-job",
            )
        )
    elif len(name) > checks.DNS_SUBDOMAIN_MAX or not checks.is_dns_subdomain(name):
        errors.append(
            FieldError(
                "metadata.name",
                f"{short(name)} is not a valid name: lowercase letters, digits, '-' and '.', "
                f"starting and ending with a letter or digit, at most "
                f"{checks.DNS_SUBDOMAIN_MAX} characters",
                "e.g. llama-lora-v2",
            )
        )
    namespace = meta.get("namespace")
    if namespace is not None and not (
        isinstance(namespace, str)
        and len(namespace) <= checks.DNS_LABEL_MAX
        and checks.is_dns_label(namespace)
    ):
        errors.append(
            FieldError(
                "metadata.namespace",
                f"{short(namespace)} is not a namespace name: lowercase letters, digits and "
                "'-', at most 63 characters",
                "e.g. ml-team",
            )
        )
    generate = meta.get("generateName")
    if generate is not None and not isinstance(generate, str):
        errors.append(FieldError("metadata.generateName", "must be text", "e.g. my-job-"))
    _string_map(meta, "labels", errors, values=True)
    _string_map(meta, "annotations", errors, values=False)
    for key in meta:
        if key not in _META_FIELDS:
            errors.append(FieldError(join_path("metadata", (key,)), "unknown field", "remove it"))
    return errors


# ---------------------------------------------------------------------------- public


def _without_echoes(errors: list[FieldError], json_errors: list[FieldError]) -> list[FieldError]:
    """A value JSON cannot carry was dropped: keep its error, not the ones that follow
    from it being missing."""
    out: list[FieldError] = []
    for e in errors:
        if e in json_errors or e in out:
            if e not in out:
                out.append(e)
            continue
        if any(e.path == j.path or e.path.startswith(j.path + ".") for j in json_errors):
            continue
        out.append(e)
    return out


def validate_spec(spec: Any) -> Result:
    """Validate a spec mapping (camelCase, as in YAML) as the API server would:
    strictly typed (no "4" for 4, no "yes" for true), then the rules table."""
    result = Result()
    spec, json_errors = to_api_json(spec, "spec")
    result.errors += json_errors
    spec = prune_nulls(spec)
    if not isinstance(spec, dict):
        result.errors.append(
            FieldError("spec", f"must be a mapping, not {_kind_of(spec)}", "see crds/examples/")
        )
        return result
    try:
        parsed = models.FineTuneJobSpec.model_validate_json(json.dumps(spec), strict=True)
    except ValidationError as exc:
        result.errors += _pydantic_errors(exc, "spec")
        parsed = None
    for rule, path in check_rules(apply_defaults(spec)):
        result.errors.append(FieldError(path, rule.message, rule=rule.id))
    result.errors = _without_echoes(result.errors, json_errors)
    if parsed is not None and not result.errors and parsed.output.uri is None:
        result.warnings.append(
            "spec.output.uri is not set: required on a cluster; `kubetune run` writes to ./runs"
        )
    if (
        parsed is not None
        and not result.errors
        and parsed.output.endpoint
        and parsed.output.secret_ref is None
    ):
        # The operator's allowlist is the cluster's setting, out of this check's sight.
        result.warnings.append(
            "spec.output.endpoint is set without spec.output.secretRef: on a cluster the "
            "operator reads the job's progress with its own identity only from endpoints on "
            "its allowlist (the chart's storage.endpointAllowlist; public AWS S3 and GCS by "
            "default), else the job fails with EndpointNotAllowed: name a Secret with the "
            "store's keys in spec.output.secretRef (docs/security.md)"
        )
    return result


def validate_document(doc: Any) -> Result:
    """Validate one whole FineTuneJob document (apiVersion, kind, metadata, spec)."""
    result = Result()
    doc, json_errors = to_api_json(doc)
    result.errors += json_errors
    if not isinstance(doc, dict):
        result.errors.append(
            FieldError(
                "(document)", f"must be a mapping, not {_kind_of(doc)}", "see crds/examples/"
            )
        )
        return result
    for key, want in (("apiVersion", models.API_VERSION), ("kind", models.KIND)):
        have = doc.get(key)
        if have != want:
            said = "is required" if have is None else f"is {short(have)}"
            result.errors.append(FieldError(key, said, f"use {want}"))
    result.errors += validate_metadata(doc.get("metadata"))
    extra = set(doc) - {"apiVersion", "kind", "metadata", "spec", "status"}
    for key in sorted(extra):
        result.errors.append(
            FieldError(join_path("", (key,)).lstrip("."), "unknown field", "remove it")
        )
    if "spec" not in doc or doc["spec"] is None:
        result.errors.append(FieldError("spec", "is required", "see crds/examples/"))
        return result
    spec_result = validate_spec(doc["spec"])
    result.errors = _without_echoes(result.errors + spec_result.errors, json_errors)
    result.warnings += spec_result.warnings
    if result.ok:
        # `labels: null` and the like: the API server reads a null as absent
        meta = {k: v for k, v in (doc.get("metadata") or {}).items() if v is not None}
        try:
            result.job = models.FineTuneJob.model_validate(
                {
                    **doc,
                    "metadata": meta,
                    "spec": apply_defaults(prune_nulls(doc["spec"])),
                    "status": None,
                }
            )
        except ValidationError as exc:  # a shape the checks above let through
            result.errors += _pydantic_errors(exc, "")
    return result


def resolve_spec(spec: models.FineTuneJobSpec | dict) -> models.FineTuneJobSpec:
    """Fill the defaults that depend on other fields. Raises SpecError."""
    if isinstance(spec, dict):
        result = validate_spec(spec)
        if not result.ok:
            raise SpecError(result.errors)
        spec = models.FineTuneJobSpec.model_validate(apply_defaults(spec))
    else:
        broken = check_rules(spec.to_dict())
        if broken:
            raise SpecError([FieldError(p, r.message, rule=r.id) for r, p in broken])
    spec = spec.model_copy(deep=True)
    hp = spec.hyperparameters
    method = spec.method.type
    if hp.epochs is None and hp.max_steps is None:
        hp.epochs = 1.0
    row = objectives.BY_NAME[models.Objective(spec.method.objective).value]
    if hp.learning_rate is None:
        hp.learning_rate = row.learning_rate[method]
    if row.settings and getattr(spec.method, row.settings) is None:
        setting = models.Method.model_fields[row.settings].annotation
        block = next(a for a in get_args(setting) if a is not type(None))
        setattr(spec.method, row.settings, block())
    es = spec.early_stopping
    es.mode = sweep_space.mode_for(es.metric, es.mode)
    if method in ("lora", "qlora") and spec.method.lora is None:
        spec.method.lora = models.LoraConfig()
    if method == "qlora" and spec.method.quantization is None:
        spec.method.quantization = models.QuantizationConfig()
    return spec
