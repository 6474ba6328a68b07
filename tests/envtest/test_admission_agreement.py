"""The real API server and `kubetune validate` give the same verdict on every bad
FineTuneJob in tests/admission_cases.py, and both name the field.

Documents go to the server as a dry-run create with strict field validation
(what `kubectl apply` sends); files whose bytes are the problem go through
kubectl itself. A summary line with the counts is printed (pytest -s shows it).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

from admission_cases import Case, all_doc_cases, cli_verdict, job, safe_reason, yaml_cases
from kubetune_api import models


@dataclass
class Outcome:
    case: Case
    server_ok: bool
    server_text: str
    cli_ok: bool
    cli_paths: list[str]


def _server_create(api, namespace: str, doc: dict, created: list | None = None) -> tuple[bool, str]:
    from kubernetes.client import ApiException

    try:
        obj = api.create_namespaced_custom_object(
            models.GROUP,
            models.VERSION,
            namespace,
            models.PLURAL,
            doc,
            dry_run="All",
            field_validation="Strict",
        )
        if created is not None:
            created.append(obj)
        return True, ""
    except ApiException as exc:
        if exc.status >= 500:
            raise
        try:
            body = json.loads(exc.body)
        except (TypeError, ValueError):
            return False, str(exc.body)
        causes = [c.get("field", "") for c in (body.get("details") or {}).get("causes", [])]
        return False, body.get("message", "") + "\n" + "\n".join(causes)


def _mentions(server_text: str, path: str) -> bool:
    """The server names `path` (or, for a map entry or list item, its parent)."""
    if not path or path.startswith("("):
        return True  # a file-level error: kubectl names no field either
    candidates = {path}
    if path.startswith("metadata."):
        # metadata is decoded into ObjectMeta before any schema: Go names the struct field
        field = path.split(".")[1]
        candidates |= {f"ObjectMeta.{field}", f"the {field} of the provided object"}
    # below a map entry the server writes the key as a field (parameters.KEY.values)
    # where the CLI brackets it (parameters[KEY].values): keys of a sweep hold dots
    candidates.add(re.sub(r"\[([^\]\d][^\]]*)\]", r".\1", path))
    # and the other way: a CEL rule's error below a map entry brackets its key
    # (grader.graders[exact].input) where the CLI writes a plain key as a field
    parts = path.split(".")
    for i in range(3, len(parts)):
        candidates.add(".".join(parts[:i]) + f"[{parts[i]}]." + ".".join(parts[i + 1 :]))
    # map keys: the server names the map (spec.resources.nodeSelector, metadata.labels)
    trimmed = re.sub(r"(\[[^\]]*\]|\.[^.\[]+)$", "", path)
    if trimmed:
        candidates.add(trimmed)
    return any(c in server_text for c in candidates)


def _compare(outcomes: list[Outcome]) -> dict:
    disagreements, unnamed, unexplained, wrong = [], [], [], []
    refused = accepted = 0
    for o in outcomes:
        if o.server_ok != o.cli_ok:
            disagreements.append(
                f"{o.case.id}: server {'accepts' if o.server_ok else 'refuses'}, CLI "
                f"{'accepts' if o.cli_ok else 'refuses'} | server: {o.server_text[:300]!r} | "
                f"CLI: {o.cli_paths}"
            )
            continue
        if o.server_ok:
            accepted += 1
            if o.case.refuse is not None:
                wrong.append(f"{o.case.id}: both accept; must be refused at {o.case.refuse}")
            elif not safe_reason(o.case):
                unexplained.append(o.case.id)
            continue
        refused += 1
        if o.case.yaml is None and not any(_mentions(o.server_text, p) for p in o.cli_paths):
            unnamed.append(f"{o.case.id}: CLI {o.cli_paths} | server {o.server_text[:300]!r}")
        if o.case.refuse and not any(p.startswith(o.case.refuse) for p in o.cli_paths):
            wrong.append(f"{o.case.id}: CLI names {o.cli_paths}, not {o.case.refuse}")
        if o.case.refuse and o.case.yaml is None and not _mentions(o.server_text, o.case.refuse):
            wrong.append(f"{o.case.id}: server does not name {o.case.refuse}: {o.server_text!r}")
    return {
        "tried": len(outcomes),
        "refused_by_both": refused,
        "accepted_by_both": accepted,
        "disagreements": disagreements,
        "field_not_named_by_both": unnamed,
        "accepted_without_reason": unexplained,
        "wrong_verdict_or_field": wrong,
    }


def _report(title: str, summary: dict) -> None:
    counts = {k: (len(v) if isinstance(v, list) else v) for k, v in summary.items()}
    print(f"\n{title}: {json.dumps(counts)}")
    for key in (
        "disagreements",
        "field_not_named_by_both",
        "accepted_without_reason",
        "wrong_verdict_or_field",
    ):
        for line in summary[key][:40]:
            print(f"  {key}: {line}")


def _assert_clean(summary: dict) -> None:
    assert summary["disagreements"] == []
    assert summary["field_not_named_by_both"] == []
    assert summary["accepted_without_reason"] == []
    assert summary["wrong_verdict_or_field"] == []


@pytest.fixture(scope="module")
def custom_objects(kube, kubetune_crd):
    from kubernetes import client

    api = kube.api_client()
    yield client.CustomObjectsApi(api)
    api.close()


def test_every_document_case_gets_the_same_verdict(kube, custom_objects, namespace):
    outcomes, created = [], []
    for case in all_doc_cases():
        server_ok, text = _server_create(custom_objects, namespace, case.doc, created)
        verdict = cli_verdict(case)
        outcomes.append(Outcome(case, server_ok, text, verdict.ok, verdict.paths))
    summary = _compare(outcomes)
    _report("document cases", summary)
    assert summary["tried"] > 800
    _assert_clean(summary)
    _children_are_admitted(kube, custom_objects, namespace, created)


def _children_are_admitted(kube, custom_objects, namespace: str, created: list[dict]) -> None:
    """Every job the API server accepted yields a RayJob and pods that Kubernetes
    accepts too: nothing admitted fails later, at Pod creation."""
    from kubernetes import client
    from kubernetes.client import ApiException

    from kubetune_operator.children import Settings, spec_to_rayjob

    api = kube.api_client()
    core = client.CoreV1Api(api)
    scheduling = client.SchedulingV1Api(api)
    try:
        scheduling.create_priority_class(
            client.V1PriorityClass(metadata=client.V1ObjectMeta(name="high-priority"), value=1000)
        )
    except ApiException as exc:
        if exc.status != 409:
            raise
    refused = []
    pods = 0
    for obj in created:
        obj["metadata"]["namespace"] = namespace
        obj["metadata"].setdefault("uid", "00000000-0000-0000-0000-000000000000")
        rayjob = spec_to_rayjob(obj, Settings(), 1)
        try:
            custom_objects.create_namespaced_custom_object(
                "ray.io", "v1", namespace, "rayjobs", rayjob, dry_run="All"
            )
        except ApiException as exc:
            refused.append(f"{obj['metadata']['name']} RayJob: {exc.body[:300]}")
        cluster = rayjob["spec"]["rayClusterSpec"]
        templates = [cluster["headGroupSpec"]["template"]] + [
            g["template"] for g in cluster["workerGroupSpecs"]
        ]
        for i, template in enumerate(templates):
            pod = {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {"name": f"{rayjob['metadata']['name']}-{i}"},
                "spec": template["spec"],
            }
            try:
                core.create_namespaced_pod(namespace, pod, dry_run="All")
                pods += 1
            except ApiException as exc:
                refused.append(f"{obj['metadata']['name']} pod {i}: {exc.body[:300]}")
    api.close()
    print(f"\nchildren of accepted jobs: {len(created)} RayJobs, {pods} pods admitted")
    assert refused == []
    assert len(created) > 100


def test_every_file_case_gets_the_same_verdict_from_kubectl(
    kube, kubetune_crd, namespace, tmp_path
):
    outcomes = []
    for i, case in enumerate(yaml_cases()):
        path = tmp_path / f"{i:03d}.yaml"
        path.write_bytes(case.yaml)
        out = kube.kubectl(
            "apply", "--dry-run=server", "-n", namespace, "-f", str(path), check=False, timeout=60
        )
        verdict = cli_verdict(case)
        outcomes.append(
            Outcome(case, out.returncode == 0, out.stderr + out.stdout, verdict.ok, verdict.paths)
        )
    summary = _compare(outcomes)
    _report("file cases (kubectl)", summary)
    _assert_clean(summary)


# ---------------------------------------------------------------------------- fuzzing

_value = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**40), max_value=2**40),
    st.floats(allow_nan=False, allow_infinity=False, width=32),
    st.sampled_from(
        [
            "",
            "4",
            "true",
            "auto",
            "s3://",
            "s3://b/x",
            "a b",
            "\u202e",
            "x" * 300,
            "nvidia.com/gpu",
            "Exists",
            "NoExecute",
            "8Gi",
            "-1",
        ]
    ),
    st.lists(st.sampled_from(["a", "", 1]), max_size=3),
    st.dictionaries(
        st.sampled_from(["a", "key", "bogus", "name", "uri"]),
        st.sampled_from(["x", 1, "s3://b/x"]),
        max_size=2,
    ),
)


def _paths(node, prefix=()):
    if isinstance(node, dict):
        for k, v in node.items():
            yield (*prefix, k)
            yield from _paths(v, (*prefix, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield (*prefix, i)
            yield from _paths(v, (*prefix, i))


_PATHS = list(_paths(job()["spec"]))


@st.composite
def _jobs(draw):
    doc = job(name="fuzz")
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(_PATHS))
        node = doc["spec"]
        try:
            for part in path[:-1]:
                node = node[part]
            node[path[-1]] = draw(_value)
        except (KeyError, IndexError, TypeError):
            pass  # an earlier mutation replaced the parent
    return doc


def test_fuzzed_jobs_get_the_same_verdict(custom_objects, namespace):
    outcomes: list[Outcome] = []

    @seed(20261122)
    @settings(
        max_examples=150, deadline=None, suppress_health_check=list(HealthCheck), database=None
    )
    @given(_jobs())
    def check(doc):
        case = Case(f"fuzz-{len(outcomes)}", doc)
        server_ok, text = _server_create(custom_objects, namespace, doc)
        verdict = cli_verdict(case)
        outcomes.append(Outcome(case, server_ok, text, verdict.ok, verdict.paths))

    check()
    summary = _compare(outcomes)
    summary["accepted_without_reason"] = []  # random valid mutations need no reason
    _report("fuzzed documents", summary)
    assert summary["tried"] >= 100
    assert summary["disagreements"] == []
    assert summary["field_not_named_by_both"] == []


def test_kubectl_explain_says_defaults_ranges_and_types(kube, kubetune_crd):
    def explain(field: str) -> str:
        out = kube.kubectl("explain", f"finetunejobs.{field}", "--api-version=kubetune.io/v1alpha1")
        return " ".join(out.stdout.split())

    spec = explain("spec")
    assert "What to fine-tune" in spec
    assert "evaluation <Object>" in spec and "held-out data" in spec
    epochs = explain("spec.hyperparameters.epochs")
    assert "Greater than 0, at most 1000." in epochs
    dropout = explain("spec.method.lora.dropout")
    assert "Default: 0.05. At least 0, less than 1." in dropout
    zero = explain("spec.distributed.zeroStage")
    assert "an integer 0 to 3, or the text auto" in zero and "Default: auto." in zero, zero
    toleration = explain("spec.resources.tolerations.operator")
    assert "Exists" in toleration and "Equal" in toleration
