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
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from typing import Any, Optional

from pydantic import BaseModel, ValidationError

from . import models
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
        ann = f.annotation
        args = getattr(ann, "__args__", ())
        candidates = [ann, *args]
        nxt = None
        for c in candidates:
            if isinstance(c, type) and issubclass(c, BaseModel):
                nxt = c
            for inner in getattr(c, "__args__", ()):
                if isinstance(inner, type) and issubclass(inner, BaseModel):
                    nxt = inner
        if nxt is None:
            return None
        model = nxt
    return model


def _hint(err: dict, loc: tuple) -> Optional[str]:
    kind = err["type"]
    if kind == "extra_forbidden":
        owner = _model_for_path(loc)
        if owner is not None:
            known = [f.alias or n for n, f in owner.model_fields.items()]
            close = difflib.get_close_matches(str(loc[-1]), known, n=1)
            if close:
                return f"did you mean {close[0]}?"
            return "known fields here: " + ", ".join(known)
        return "remove it"
    if kind in ("literal_error", "enum"):
        expected = err.get("ctx", {}).get("expected")
        return f"use one of {expected}" if expected else None
    if kind == "missing":
        return "add this field"
    if kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
        return "pick a value inside the bounds"
    if kind.endswith("_type") or kind.endswith("_parsing"):
        return f"give a {kind.split('_')[0]}"
    if kind == "string_pattern_mismatch":
        return "write it like 500m, 8 or 16Gi"
    return None


def _is_union_tag(part: str) -> bool:
    """pydantic names union branches in error locations; they are not fields."""
    return "[" in part or part in ("int", "str", "float", "bool", "constrained-int")


def _pydantic_errors(exc: ValidationError, prefix: str) -> list[FieldError]:
    out = []
    seen = set()
    for err in exc.errors():
        loc = tuple(err["loc"])
        # Union[Literal['auto'], int] reports once per branch: keep the first.
        clean = tuple(p for p in loc if not (isinstance(p, str) and _is_union_tag(p)))
        path = ".".join([prefix, *[str(p) if not isinstance(p, int) else f"[{p}]" for p in clean]])
        path = path.replace(".[", "[")
        if path in seen:
            continue
        seen.add(path)
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown field"
        elif err["type"] in ("literal_error", "enum"):
            msg = f"{err.get('input')!r} is not allowed"
        elif err["type"] == "string_pattern_mismatch":
            msg = f"{err.get('input')!r} is not a Kubernetes quantity"
        if "zeroStage" in path:
            msg, hint = "must be 0, 1, 2, 3 or auto", "e.g. zeroStage: 3"
        else:
            hint = _hint(err, clean)
        out.append(FieldError(path, msg, hint))
    return out


# ---------------------------------------------------------------------------- public


def validate_spec(spec: Any) -> Result:
    """Validate a spec mapping (camelCase, as in YAML)."""
    result = Result()
    if not isinstance(spec, dict):
        result.errors.append(FieldError("spec", "must be a mapping", "see crds/examples/"))
        return result
    try:
        parsed = models.FineTuneJobSpec.model_validate(spec)
    except ValidationError as exc:
        result.errors += _pydantic_errors(exc, "spec")
        parsed = None
    for rule, path in check_rules(apply_defaults(spec)):
        result.errors.append(FieldError(path, rule.message, rule=rule.id))
    if parsed is not None and not result.errors and parsed.output.uri is None:
        result.warnings.append(
            "spec.output.uri is not set: required on a cluster; `kubetune run` writes to ./runs"
        )
    return result


def validate_document(doc: Any) -> Result:
    """Validate one whole FineTuneJob document (apiVersion, kind, metadata, spec)."""
    result = Result()
    if not isinstance(doc, dict):
        result.errors.append(FieldError("(document)", "must be a mapping", "see crds/examples/"))
        return result
    if doc.get("apiVersion") != models.API_VERSION:
        result.errors.append(
            FieldError("apiVersion", f"is {doc.get('apiVersion')!r}", f"use {models.API_VERSION}")
        )
    if doc.get("kind") != models.KIND:
        result.errors.append(FieldError("kind", f"is {doc.get('kind')!r}", f"use {models.KIND}"))
    meta = doc.get("metadata") or {}
    if not isinstance(meta, dict) or not meta.get("name"):
        result.errors.append(FieldError("metadata.name", "is required", "name the job"))
    extra = set(doc) - {"apiVersion", "kind", "metadata", "spec", "status"}
    for key in sorted(extra):
        result.errors.append(FieldError(key, "unknown field", "remove it"))
    if "spec" not in doc:
        result.errors.append(FieldError("spec", "is required", "see crds/examples/"))
        return result
    spec_result = validate_spec(doc["spec"])
    result.errors += spec_result.errors
    result.warnings += spec_result.warnings
    if result.ok:
        result.job = models.FineTuneJob.model_validate(
            {**doc, "spec": apply_defaults(doc["spec"]), "status": None}
        )
    return result


DEFAULT_LEARNING_RATE = {"lora": 2e-4, "qlora": 2e-4, "full": 2e-5}


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
    if hp.learning_rate is None:
        hp.learning_rate = DEFAULT_LEARNING_RATE[method]
    if method in ("lora", "qlora") and spec.method.lora is None:
        spec.method.lora = models.LoraConfig()
    if method == "qlora" and spec.method.quantization is None:
        spec.method.quantization = models.QuantizationConfig()
    return spec
