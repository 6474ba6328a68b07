"""Bad (and borderline) FineTuneJobs, for the admission tests of both enforcers.

`spec_cases()` mutates every field of a FineTuneJob that sets every field
(`FULL`), once per kind of mistake its type invites: wrong type, out of
range, empty, too long, hostile characters. `written_cases()` adds the
mistakes a person makes that a type cannot describe (a toleration that no
taint matches, credentials in a URI, a name Kubernetes refuses). `yaml_cases()`
are files whose bytes are the problem (aliases, encodings, numbers YAML
parsers disagree on) and go through kubectl itself.

A case with `refuse` names the field both enforcers must report; a case in
`SAFE` is one both accept, with the reason that is fine. The tests in
tests/unit/test_admission_cli.py and tests/envtest/test_admission_agreement.py
run them all.
"""

from __future__ import annotations

import copy
import json
import re
from dataclasses import dataclass
from typing import Any, Optional

from kubetune_api.crd import spec_schema

API = {"apiVersion": "kubetune.io/v1alpha1", "kind": "FineTuneJob"}

FULL_SPEC: dict[str, Any] = {
    "model": {
        "name": "org/model",
        "revision": "main",
        "ggufFile": "model.Q8_0.gguf",
        "trustRemoteCode": False,
        "tokenSecretRef": {"name": "hf-token"},
        "endpoint": "https://minio.example:9000",
        "region": "us-east-1",
        "secretRef": {"name": "s3-creds"},
        "fromJob": "chat-v1",
        "mergeParent": True,
    },
    "dataset": {
        "train": {"uri": "s3://bucket/train.jsonl"},
        "validation": {"name": "org/chats", "split": "test"},
        "test": {"uri": "s3://bucket/test.jsonl"},
        "validationSplit": 0.05,
        "format": "chat",
        "maxSeqLength": 2048,
        "packing": True,
        "clean": {"action": "drop", "nearDuplicateThreshold": 0.8, "pii": ["email", "key"]},
        "endpoint": "https://minio.example:9000",
        "region": "us-east-1",
        "secretRef": {"name": "s3-creds"},
    },
    "method": {
        "task": "generation",
        "objective": "sft",
        "type": "lora",
        "lora": {
            "r": 16,
            "alpha": 32,
            "dropout": 0.05,
            "targetModules": ["q_proj", "v_proj"],
            "modulesToSave": ["lm_head"],
        },
    },
    "hyperparameters": {
        "epochs": 2,
        "learningRate": 0.0002,
        "lrScheduler": "cosine",
        "warmupRatio": 0.03,
        "weightDecay": 0.01,
        "batchSize": 4,
        "gradientAccumulationSteps": 2,
        "maxGradNorm": 1.0,
        "precision": "bf16",
        "gradientCheckpointing": True,
        "seed": 7,
        "logEverySteps": 10,
    },
    "distributed": {"zeroStage": 3, "offloadOptimizer": True, "offloadParameters": True},
    "resources": {
        "workers": 2,
        "gpusPerWorker": 1,
        "gpuResourceName": "nvidia.com/gpu",
        "cpuPerWorker": "8",
        "memoryPerWorker": "64Gi",
        "head": {"cpu": "2", "memory": "8Gi"},
        "nodeSelector": {"nvidia.com/gpu.product": "A100-SXM4-80GB"},
        "tolerations": [
            {
                "key": "dedicated",
                "operator": "Equal",
                "value": "ml",
                "effect": "NoExecute",
                "tolerationSeconds": 300,
            }
        ],
        "priorityClassName": "high-priority",
        "image": "ghcr.io/kubetune/kubetune-trainer:0.1.0",
    },
    "evaluation": {
        "enabled": True,
        "everySteps": 100,
        "maxBatches": 20,
        "generation": {
            "examples": 16,
            "maxNewTokens": 128,
            "doSample": True,
            "temperature": 0.7,
            "topP": 0.9,
            "seed": 3,
        },
        "calibration": {"fitTemperature": True, "saveTemperature": True},
        "retention": {
            "dataset": {"uri": "s3://bucket/general.jsonl", "format": "chat"},
            "maxExamples": 256,
            "maxRegression": 0.05,
            "failOnRegression": True,
            "generation": True,
        },
    },
    "earlyStopping": {
        "enabled": True,
        "metric": "eval_loss",
        "mode": "min",
        "patience": 3,
        "minDelta": 0.001,
    },
    "checkpointing": {
        "everySteps": 200,
        "keepLast": 3,
        "saveOnStop": True,
        "terminationGracePeriodSeconds": 300,
    },
    "output": {
        "uri": "s3://bucket/fine-tunes",
        "mergeAdapter": True,
        "gguf": {"types": ["q8_0", "q4_0"], "enforceTolerance": False},
        "endpoint": "https://minio.example:9000",
        "region": "us-east-1",
        "secretRef": {"name": "s3-creds"},
    },
    "staging": {"claimName": "kubetune-stage"},
    "tracking": {
        "mlflow": {
            "trackingUri": "https://mlflow.example:5000",
            "experiment": "chat",
            "secretRef": {"name": "mlflow-creds"},
        }
    },
    "sweep": {
        "parameters": {
            "hyperparameters.learningRate": {
                "distribution": "logUniform",
                "low": 1e-5,
                "high": 1e-3,
            },
            "method.lora.r": {"distribution": "choice", "values": [8, 16, 32]},
        },
        "metric": "eval_loss",
        "mode": "min",
        "trials": 8,
        "parallelTrials": 2,
        "algorithm": "tpe",
        "earlyStopping": {"enabled": True, "gracePeriod": 20, "reductionFactor": 3},
    },
    "suspend": False,
    "backoffLimit": 3,
    "activeDeadlineSeconds": 86400,
    "startTimeoutSeconds": 1800,
    "ttlSecondsAfterFinished": 3600,
}


@dataclass
class Case:
    id: str
    doc: Any = None  # a document as kubectl sends it (JSON types)
    yaml: Optional[bytes] = None  # or the bytes of a file, for cases about the file itself
    refuse: Optional[str] = None  # the field both must name when they refuse it

    @property
    def name(self) -> str:
        """The metadata.name the case is applied under (unique per case)."""
        meta = self.doc.get("metadata") if isinstance(self.doc, dict) else None
        return meta.get("name") if isinstance(meta, dict) else ""


def job(spec: Any = None, name: str = "ok", **top: Any) -> dict:
    return {
        **API,
        "metadata": {"name": name},
        "spec": copy.deepcopy(FULL_SPEC) if spec is None else spec,
        **top,
    }


def _set(doc: dict, path: str, value: Any) -> dict:
    """`path` is dotted below the document; `[i]` indexes a list; `value` of
    `DELETE` removes the key."""
    parts = path.replace("[", ".[").split(".")
    node = doc
    for part in parts[:-1]:
        node = node[int(part[1:-1])] if part.startswith("[") else node[part]
    last = parts[-1]
    if last.startswith("["):
        node[int(last[1:-1])] = value
    elif value is DELETE:
        node.pop(last, None)
    else:
        node[last] = value
    return doc


DELETE = object()


_URI_FIELDS = (
    "model.uri",
    "model.fromCheckpoint",
    "dataset.train.uri",
    "dataset.validation.uri",
    "dataset.test.uri",
    "output.uri",
)
_QUANTITY_FIELDS = (
    "resources.cpuPerWorker",
    "resources.memoryPerWorker",
    "resources.scratchPerWorker",
    "resources.head.cpu",
    "resources.head.memory",
)
_BYTE_FIELDS = (
    "resources.memoryPerWorker",
    "resources.scratchPerWorker",
    "resources.head.memory",
)
# Bucket names no object store holds (S3's rules for s3://, Cloud Storage's for gs://
# and gcs://), and borderline ones they do; tests/unit/test_field_checks.py uses them too.
BAD_BUCKETS = {
    "short": "s3://ab/x",
    "long": "s3://" + "a" * 64 + "/x",
    "uppercase": "s3://Fine-Tunes/x",
    "underscore": "s3://fine_tunes/x",
    "dot-start": "s3://.bucket/x",
    "dot-end": "s3://bucket./x",
    "dash-start": "s3://-bucket/x",
    "dash-end": "s3://bucket-/x",
    "two-dots": "s3://my..bucket/x",
    "dash-dot": "s3://my-.bucket/x",
    "dot-dash": "s3://my.-bucket/x",
    "ip": "s3://192.168.5.4/x",
    "gs-uppercase": "gs://Data/x",
    "gs-short": "gs://ab/x",
    "gs-long-without-dots": "gs://" + "a" * 64 + "/x",
    "gs-part-64": "gcs://a." + "b" * 64 + "/x",
    "gs-223-with-dots": "gs://" + ".".join(["a" * 55] * 4) + "ab/x",
    "gs-underscore-end": "gs://data_/x",
    "gs-two-dots": "gcs://a..b/x",
    "gs-ip": "gs://10.0.0.1/x",
    "gs-goog": "gs://goog-data/x",
    "gs-google": "gs://my-google-data/x",
}
GOOD_BUCKETS = {
    "three": "s3://abc/x",
    "sixty-three": "s3://" + "a" * 63 + "/x",
    "dotted": "s3://my.data-1.example/x",
    "no-path": "s3://my-bucket",
    "digits": "s3://123/x",
    "not-an-ip": "s3://1.2.3/x",
    "gs-underscore": "gs://my_bucket/x",
    "gs-222-with-dots": "gs://" + ".".join(["a" * 63] * 3) + "." + "b" * 30 + "/x",
    "gcs-scheme": "gcs://my-bucket/x",
}
_ENDPOINT_FIELDS = ("model.endpoint", "dataset.endpoint", "output.endpoint")


def mutate(path: str, value: Any) -> dict:
    return _set(job(), path, value)


def dpo_job() -> dict:
    """FULL_SPEC as a preference-tuning job: every DPO field set."""
    doc = job()
    spec = doc["spec"]
    spec["dataset"]["format"] = "preference"
    spec["evaluation"].pop("calibration")  # answer tokens only
    spec["method"]["objective"] = "dpo"
    spec["method"]["dpo"] = {"beta": 0.1, "lossType": "sigmoid", "labelSmoothing": 0.1}
    spec["earlyStopping"].update({"metric": "eval_reward_accuracy", "mode": "max"})
    return doc


def kto_job() -> dict:
    """FULL_SPEC as a job learning from thumbs up/down feedback: every KTO field set."""
    doc = job()
    spec = doc["spec"]
    spec["dataset"]["format"] = "feedback"
    spec["evaluation"].pop("calibration")  # answer tokens only
    spec["method"]["objective"] = "kto"
    spec["method"]["kto"] = {"beta": 0.1, "desirableWeight": 1.33, "undesirableWeight": 1.0}
    spec["earlyStopping"].update({"metric": "eval_ranking_accuracy", "mode": "max"})
    return doc


def mixture_job() -> dict:
    """FULL_SPEC trained on a mixture of two sources (no train, validation or clean:
    a mixture holds out validationSplit of each source), every source field set."""
    doc = job()
    ds = doc["spec"]["dataset"]
    for key in ("train", "validation", "clean"):
        ds.pop(key)
    ds["mixture"] = [
        {"id": "chat", "uri": "s3://bucket/chat.jsonl", "weight": 3.0},
        {"id": "math_qa", "name": "org/math", "split": "train", "format": "alpaca", "weight": 1.0},
    ]
    ds["mixtureTemperature"] = 2.0
    return doc


def prune_job() -> dict:
    """FULL_SPEC with structured pruning (its adapter merged, as pruning needs)."""
    return _set(job(), "spec.model.prune", {"keepLayers": 15})


def full_job() -> dict:
    """FULL_SPEC as a full fine-tune with every method.full field set (no adapter to
    merge or sweep)."""
    doc = job()
    spec = doc["spec"]
    spec["method"] = {
        "objective": "sft",
        "type": "full",
        "full": {
            "trainableLayers": [29],
            "trainEmbeddings": False,
            "trainHead": False,
            "unfreeze": {"everySteps": 100},
            "layerLrDecay": 0.9,
        },
    }
    spec["model"]["mergeParent"] = False
    spec["output"]["mergeAdapter"] = False
    spec["sweep"]["parameters"].pop("method.lora.r")
    return doc


_LR_ONLY = {
    "hyperparameters.learningRate": {"distribution": "logUniform", "low": 1e-5, "high": 1e-3}
}


def classification_job() -> dict:
    """FULL_SPEC as a classification head (method.task classification): without what
    the task refuses (answers generated or scored, retention, GGUF)."""
    doc = job()
    spec = doc["spec"]
    spec["dataset"]["format"] = "classification"
    spec["method"]["task"] = "classification"
    for key in ("generation", "calibration", "retention"):
        spec["evaluation"].pop(key)
    spec["output"].pop("gguf")
    for key in ("fromJob", "mergeParent"):
        spec["model"].pop(key)
    spec["earlyStopping"].update({"metric": "eval_f1", "mode": "max"})
    spec["sweep"].update({"metric": "eval_accuracy", "mode": "max"})
    return doc


def lora_layers_job() -> dict:
    """FULL_SPEC with adapters on one decoder layer only."""
    return _set(job(), "spec.method.lora.layers", [3])


def grpo_job() -> dict:
    """FULL_SPEC as a GRPO job: every method.grpo setting set (its grader: one check)."""
    doc = job()
    spec = doc["spec"]
    spec["dataset"]["format"] = "prompt"
    spec["evaluation"].pop("calibration")  # answer tokens only
    spec["method"]["objective"] = "grpo"
    spec["method"]["grpo"] = {
        "generationsPerPrompt": 4,
        "maxNewTokens": 64,
        "temperature": 0.9,
        "topP": 0.95,
        "beta": 0.04,
        "epsilon": 0.2,
        "lossType": "drGrpo",
        "iterations": 2,
        "grader": {
            "type": "stringCheck",
            "name": "exact",
            "reference": "{{item.answer}}",
            "operation": "eq",
        },
    }
    spec["earlyStopping"]["metric"] = "eval_reward"
    spec["earlyStopping"]["mode"] = "max"
    return doc


def distill_job() -> dict:
    """FULL_SPEC as a distillation job: every method.distill setting set (logits mode,
    so maxNewTokens, a sequence-mode setting, may take its whole range)."""
    doc = job()
    spec = doc["spec"]
    spec["method"]["objective"] = "distill"
    spec["method"]["distill"] = {
        "teacher": {"name": "org/teacher", "revision": "main"},
        "mode": "logits",
        "loss": "reverseKL",
        "temperature": 2.0,
        "weight": 0.7,
        "maxNewTokens": 64,
        "onPolicyFraction": 0.0,
    }
    spec["earlyStopping"].update({"metric": "eval_agreement", "mode": "max"})
    return doc


# ---------------------------------------------------------------------------- generated


def _leaves(node: dict, path: str, spec: Any):
    """(path, schema node) for every field present in FULL_SPEC."""
    for name, sub in node.get("properties", {}).items():
        if not isinstance(spec, dict) or name not in spec:
            continue
        here = f"{path}.{name}"
        yield here, sub
        if sub.get("type") == "object" and "properties" in sub:
            yield from _leaves(sub, here, spec[name])
        elif sub.get("type") == "array" and "properties" in sub.get("items", {}):
            for i, item in enumerate(spec[name]):
                yield from _leaves(sub["items"], f"{here}[{i}]", item)


HUGE = 1024 * 1024


def _variants(node: dict) -> list[tuple[str, Any]]:
    kind = node.get("type")
    if node.get("x-kubernetes-int-or-string"):
        return [
            ("str-digit", "3"),
            ("float", 2.5),
            ("big", 4),
            ("neg", -1),
            ("word", "x"),
            ("bool", True),
            ("list", [1]),
        ]
    if "enum" in node:
        return [
            ("unknown", "nope"),
            ("empty", ""),
            ("number", 1),
            ("bool", True),
            ("case", str(node["enum"][0]).upper()),
            ("list", [node["enum"][0]]),
        ]
    if kind == "string":
        longest = node.get("maxLength", 256)
        return [
            ("number", 123),
            ("bool", True),
            ("list", ["a"]),
            ("map", {"a": "b"}),
            ("empty", ""),
            ("blank", "   "),
            ("too-long", "a" * (longest + 1)),
            ("bidi", "abc\u202egpj.exe"),
            ("bell", "a\x07b"),
            ("newline", "a\nb"),
            ("tab", "a\tb"),
            ("nul", "a\x00b"),
            ("space-inside", "a b"),
        ]
    if kind == "integer":
        # Numbers outside int64 change on the way through kubectl (go-yaml reads
        # them as floats): yaml_cases() sends those through kubectl itself.
        out = [("str-digit", "4"), ("fraction", 4.5), ("bool", True), ("list", [4])]
        if "minimum" in node:
            out.append(("below-min", node["minimum"] - 1))
        if "maximum" in node:
            out.append(("above-max", node["maximum"] + 1))
        return out
    if kind == "number":
        out = [("str-digit", "0.5"), ("bool", False), ("list", [0.5]), ("huge", 1e300)]
        if "minimum" in node:
            out.append(("at-min", node["minimum"]))
            out.append(("below-min", node["minimum"] - 0.001))
        if "maximum" in node:
            out.append(("at-max", node["maximum"]))
            out.append(("above-max", node["maximum"] + 0.001))
        return out
    if kind == "boolean":
        return [("str-true", "true"), ("yes", "yes"), ("one", 1), ("zero", 0), ("list", [True])]
    if kind == "object":
        return [("string", "x"), ("number", 1), ("list", []), ("unknown-field", {"bogus": 1})]
    if kind == "array":
        item = node.get("items", {})
        out = [
            ("string", "x"),
            ("map", {}),
            ("null-item", [None]),
            ("too-many", ["a"] * (node.get("maxItems", 64) + 1)),
        ]
        if item.get("type") == "string":
            out += [("number-item", [1]), ("empty-item", [""]), ("bidi-item", ["a\u202eb"])]
        return out
    return []


def spec_cases() -> list[Case]:
    cases = []
    for path, node in _leaves(spec_schema(), "spec", FULL_SPEC):
        for label, value in _variants(node):
            cases.append(Case(f"{path[5:]}:{label}", mutate(path, value)))
        if path.count(".") >= 2 and not path.endswith("]"):
            cases.append(Case(f"{path[5:]}:absent", mutate(path, DELETE)))
            cases.append(Case(f"{path[5:]}:null", mutate(path, None)))
    # each objective's settings block, on a job of that objective (grpo's grader: in
    # grader_cases())
    blocks = (
        (dpo_job, "spec.method.dpo", None),
        (kto_job, "spec.method.kto", None),
        (grpo_job, "spec.method.grpo", "spec.method.grpo.grader"),
        (distill_job, "spec.method.distill", None),
        (prune_job, "spec.model.prune", None),
        (full_job, "spec.method.full", None),
        (lora_layers_job, "spec.method.lora.layers", None),
        (mixture_job, "spec.dataset.mixture", None),
    )
    for make, block, elsewhere in blocks:
        for path, node in _leaves(spec_schema(), "spec", make()["spec"]):
            if not path.startswith(block) or (elsewhere and path.startswith(elsewhere)):
                continue  # the rest is covered on FULL_SPEC above
            for label, value in _variants(node):
                cases.append(Case(f"{path[5:]}:{label}", _set(make(), path, value)))
            if path.count(".") >= 3:
                cases.append(Case(f"{path[5:]}:absent", _set(make(), path, DELETE)))
                cases.append(Case(f"{path[5:]}:null", _set(make(), path, None)))
    return cases


# ---------------------------------------------------------------------------- written


def _written() -> list[Case]:
    c: list[Case] = []

    def add(cid: str, doc: dict, refuse: Optional[str] = None) -> None:
        c.append(Case(cid, doc, refuse=refuse))

    tol = "spec.resources.tolerations"

    def tolerations(*items: dict) -> dict:
        return mutate("spec.resources.tolerations", list(items))

    # tolerations, as ValidateTolerations sees them
    add(
        "tol:exists-with-value",
        tolerations({"key": "k", "operator": "Exists", "value": "v"}),
        f"{tol}[0].value",
    )
    add("tol:no-key-equal", tolerations({"operator": "Equal", "value": "v"}), f"{tol}[0].operator")
    add("tol:no-key-no-operator", tolerations({"effect": "NoSchedule"}), f"{tol}[0].operator")
    add(
        "tol:seconds-without-noexecute",
        tolerations(
            {"key": "k", "operator": "Exists", "effect": "NoSchedule", "tolerationSeconds": 5}
        ),
        f"{tol}[0].tolerationSeconds",
    )
    add(
        "tol:seconds-without-effect",
        tolerations({"key": "k", "operator": "Exists", "tolerationSeconds": 5}),
        f"{tol}[0].tolerationSeconds",
    )
    add("tol:bad-key", tolerations({"key": "bad key", "operator": "Exists"}), f"{tol}[0].key")
    add(
        "tol:key-prefix-uppercase",
        tolerations({"key": "Example.com/k", "operator": "Exists"}),
        f"{tol}[0].key",
    )
    add("tol:value-too-long", tolerations({"key": "k", "value": "v" * 64}), f"{tol}[0].value")
    add("tol:value-slash", tolerations({"key": "k", "value": "a/b"}), f"{tol}[0].value")
    add(
        "tol:operator-lowercase",
        tolerations({"key": "k", "operator": "exists"}),
        f"{tol}[0].operator",
    )
    add("tol:effect-empty-string", tolerations({"key": "k", "effect": ""}), f"{tol}[0].effect")
    add(
        "tol:second-item-bad",
        tolerations({"operator": "Exists"}, {"key": "k", "operator": "Exists", "value": "x"}),
        f"{tol}[1].value",
    )
    add(
        "tol:unknown-field",
        tolerations({"key": "k", "operator": "Exists", "seconds": 1}),
        f"{tol}[0].seconds",
    )
    # names Kubernetes would refuse at Pod creation
    ns = "spec.resources.nodeSelector"
    add("node-selector:key-space", mutate(ns, {"gpu type": "a100"}), ns)
    add("node-selector:key-two-slashes", mutate(ns, {"a/b/c": "x"}), ns)
    add("node-selector:key-empty", mutate(ns, {"": "x"}), ns)
    add("node-selector:key-long-name", mutate(ns, {"a" * 64: "x"}), ns)
    add("node-selector:key-long-prefix", mutate(ns, {"a" * 254 + "/b": "x"}), ns)
    add("node-selector:key-bidi", mutate(ns, {"zone\u202e": "x"}), ns)
    add("node-selector:value-space", mutate(ns, {"zone": "us east"}), ns)
    add("node-selector:value-long", mutate(ns, {"zone": "z" * 64}), ns)
    add("node-selector:value-number", mutate(ns, {"zone": 1}), ns)
    add("node-selector:value-dash-end", mutate(ns, {"zone": "us-"}), ns)
    add("node-selector:too-many", mutate(ns, {f"k{i}": "v" for i in range(65)}), ns)
    res = "spec.resources"
    add("gpu-resource:space", mutate(f"{res}.gpuResourceName", "GPU s"), f"{res}.gpuResourceName")
    add("gpu-resource:no-domain", mutate(f"{res}.gpuResourceName", "gpu"), f"{res}.gpuResourceName")
    add(
        "gpu-resource:kubernetes-io",
        mutate(f"{res}.gpuResourceName", "kubernetes.io/gpu"),
        f"{res}.gpuResourceName",
    )
    add("gpu-resource:cpu", mutate(f"{res}.gpuResourceName", "cpu"), f"{res}.gpuResourceName")
    add(
        "priority-class:underscore",
        mutate(f"{res}.priorityClassName", "high_priority"),
        f"{res}.priorityClassName",
    )
    add(
        "priority-class:uppercase",
        mutate(f"{res}.priorityClassName", "High"),
        f"{res}.priorityClassName",
    )
    add(
        "priority-class:too-long",
        mutate(f"{res}.priorityClassName", "p" * 254),
        f"{res}.priorityClassName",
    )
    claim = "spec.staging.claimName"
    add("staging-claim:underscore", mutate(claim, "kubetune_stage"), claim)
    add("staging-claim:uppercase", mutate(claim, "Stage"), claim)
    add("staging-claim:absent", mutate("spec.staging", {}), claim)
    add("image:space", mutate(f"{res}.image", "ghcr.io/org/img :1.0"), f"{res}.image")
    add("image:trailing-space", mutate(f"{res}.image", "ghcr.io/org/img:1.0 "), f"{res}.image")
    add("image:uppercase-repo", mutate(f"{res}.image", "ghcr.io/Org/Img:1.0"), f"{res}.image")
    add("image:empty-tag", mutate(f"{res}.image", "ghcr.io/org/img:"), f"{res}.image")
    add("image:bad-digest", mutate(f"{res}.image", "img@sha256:xyz"), f"{res}.image")
    add("quantity:cpu-number", mutate(f"{res}.cpuPerWorker", 8), f"{res}.cpuPerWorker")
    add("quantity:memory-unit", mutate(f"{res}.memoryPerWorker", "64GB"), f"{res}.memoryPerWorker")
    add("quantity:negative", mutate(f"{res}.head.cpu", "-1"), f"{res}.head.cpu")
    # a pod with none of it cannot run the trainer; memory in thousandths of a byte
    for field in _QUANTITY_FIELDS:
        where = f"spec.{field}"
        add(f"quantity:{field}:zero", mutate(where, "0"), where)
        add(f"quantity:{field}:zero-unit", mutate(where, "0Gi"), where)
        add(f"quantity:{field}:zero-fraction", mutate(where, "0.0"), where)
        add(f"quantity:{field}:zero-milli", mutate(where, "000m"), where)
        # half a CPU, or half a byte
        bytes_ = field in _BYTE_FIELDS
        add(f"quantity:{field}:fraction", mutate(where, "0.5"), where if bytes_ else None)
        add(f"quantity:{field}:milli", mutate(where, "500m"), where if bytes_ else None)
        if bytes_:
            add(f"quantity:{field}:fraction-with-unit", mutate(where, "0.5Gi"))
    for field in (
        "model.secretRef",
        "model.tokenSecretRef",
        "dataset.secretRef",
        "output.secretRef",
    ):
        add(
            f"secret:{field}:underscore",
            mutate(f"spec.{field}.name", "s3_creds"),
            f"spec.{field}.name",
        )
        add(f"secret:{field}:uppercase", mutate(f"spec.{field}.name", "S3"), f"spec.{field}.name")
        add(f"secret:{field}:dot-start", mutate(f"spec.{field}.name", ".s3"), f"spec.{field}.name")
    # URIs
    for field in _URI_FIELDS:

        def at(value: Any, field: str = field) -> dict:
            doc = job()
            if field == "model.uri":
                doc["spec"]["model"].pop("name")
            if field == "model.fromCheckpoint":
                doc["spec"]["model"].pop("fromJob")
            if field == "dataset.validation.uri":
                doc["spec"]["dataset"]["validation"] = {}
            return _set(doc, f"spec.{field}", value)

        where = f"spec.{field}"
        add(f"uri:{field}:credentials", at("s3://AKIAEXAMPLE:secret@bucket/x"), where)
        add(f"uri:{field}:user-only", at("gs://user@bucket/x"), where)
        presigned = "s3://bucket/x?X-Amz-Credential=AKIAEXAMPLE%2F20260101&X-Amz-Signature=ab12"
        add(f"uri:{field}:query-presigned", at(presigned), where)
        add(f"uri:{field}:query-token", at("gs://bucket/x?alt=media&TOKEN=ya29.abc"), where)
        add(f"uri:{field}:query-harmless", at("s3://bucket/x?tokenizer=yes"))
        add(f"uri:{field}:no-bucket", at("s3://"), where)
        add(f"uri:{field}:no-bucket-path", at("s3:///data/x"), where)
        add(f"uri:{field}:http", at("http://example.com/x"), where)
        add(f"uri:{field}:ftp", at("ftp://host/x"), where)
        add(f"uri:{field}:bidi", at("s3://bucket/\u202ekcod.jsonl"), where)
        add(f"uri:{field}:newline", at("s3://bucket/x\ny"), where)
        add(f"uri:{field}:empty", at(""), where)
        add(f"uri:{field}:huge", at("s3://bucket/" + "x" * HUGE), where)
        add(f"uri:{field}:fragment-token", at("s3://bucket/x#access_token=abc"), where)
        for label, uri in BAD_BUCKETS.items():
            add(f"uri:{field}:bucket-{label}", at(uri), where)
        for label, uri in GOOD_BUCKETS.items():
            add(f"uri:{field}:bucket-ok-{label}", at(uri))
    add("uri:output-relative", mutate("spec.output.uri", "runs/out"), "spec.output.uri")
    add("uri:output-dot-relative", mutate("spec.output.uri", "./out"), "spec.output.uri")
    for field in _ENDPOINT_FIELDS:
        where = f"spec.{field}"
        add(
            f"endpoint:{field}:credentials",
            mutate(where, "https://key:secret@minio.example:9000"),
            where,
        )
        add(f"endpoint:{field}:s3-scheme", mutate(where, "s3://minio.example"), where)
        add(
            f"endpoint:{field}:query-sig",
            mutate(where, "https://minio.example/?sv=1&sig=abc"),
            where,
        )
        add(
            f"endpoint:{field}:query-key",
            mutate(where, "https://minio.example/?api_key=abc"),
            where,
        )
        add(f"endpoint:{field}:query-harmless", mutate(where, "https://minio.example/?keys=1"))
        add(
            f"endpoint:{field}:fragment-token",
            mutate(where, "https://minio.example/#/callback?token=abc"),
            where,
        )
        add(f"endpoint:{field}:no-scheme", mutate(where, "minio.example:9000"), where)
    # empty names and splits
    add("model:name-empty", mutate("spec.model.name", ""), "spec.model.name")
    add(
        "dataset:train-name-empty",
        mutate("spec.dataset.train", {"name": ""}),
        "spec.dataset.train.name",
    )
    add(
        "dataset:split-empty",
        mutate("spec.dataset.validation.split", ""),
        "spec.dataset.validation.split",
    )
    add(
        "dataset:target-module-empty",
        mutate("spec.method.lora.targetModules", [""]),
        "spec.method.lora.targetModules[0]",
    )
    # strict types, the everyday slips
    add("strict:workers-string", mutate("spec.resources.workers", "4"), "spec.resources.workers")
    add(
        "strict:trust-remote-code-yes",
        mutate("spec.model.trustRemoteCode", "yes"),
        "spec.model.trustRemoteCode",
    )
    add(
        "strict:zero-stage-string",
        mutate("spec.distributed.zeroStage", "3"),
        "spec.distributed.zeroStage",
    )
    add(
        "strict:epochs-string",
        mutate("spec.hyperparameters.epochs", "1"),
        "spec.hyperparameters.epochs",
    )
    add(
        "range:deadline-int64",
        mutate("spec.activeDeadlineSeconds", 2**63),
        "spec.activeDeadlineSeconds",
    )
    add(
        "range:deadline-int32",
        mutate("spec.activeDeadlineSeconds", 2**31),
        "spec.activeDeadlineSeconds",
    )
    add(
        "range:start-timeout-negative",
        mutate("spec.startTimeoutSeconds", -1),
        "spec.startTimeoutSeconds",
    )
    add(
        "range:start-timeout-int32",
        mutate("spec.startTimeoutSeconds", 2**31),
        "spec.startTimeoutSeconds",
    )
    # metadata as Kubernetes checks it
    add("meta:name-underscore", job(name="my_job"), "metadata.name")
    add("meta:name-uppercase", job(name="MyJob"), "metadata.name")
    add("meta:name-254", job(name="a" * 254), "metadata.name")
    add("meta:name-bidi", job(name="job\u202e"), "metadata.name")
    add("meta:name-empty", job(name=""), "metadata.name")
    add("meta:name-dot-end", job(name="job."), "metadata.name")
    for cid, labels in (
        ("meta:label-number", {"version": 2}),
        ("meta:label-bool", {"canary": True}),
        ("meta:label-long-value", {"team": "t" * 64}),
        ("meta:label-space-value", {"team": "ml ops"}),
        ("meta:label-bad-key", {"bad key": "x"}),
        ("meta:label-list", {"team": ["a"]}),
    ):
        doc = job(name=f"m-{len(c)}")
        doc["metadata"]["labels"] = labels
        add(cid, doc, "metadata.labels")
    for key in ("labels", "annotations"):  # null reads as absent on both sides
        doc = job(name=f"m-null-{key}")
        doc["metadata"][key] = None
        add(f"meta:{key}-null", doc)
    doc = job(name="m-annotation")
    doc["metadata"]["annotations"] = {"note": 5}
    add("meta:annotation-number", doc, "metadata.annotations")
    doc = job(name="m-unknown")
    doc["metadata"]["colour"] = "red"
    add("meta:unknown-field", doc, "metadata.colour")
    doc = job(name="m-namespace")
    doc["metadata"]["namespace"] = "Bad_NS"
    add("meta:namespace-invalid", doc, "")
    add("top:unknown-field", job(name="t-unknown", extra=1), "extra")
    for i, key in enumerate(("m[odel", "int", "str")):  # shaped like pydantic's union tags
        doc = job(name=f"t-odd-key-{i}")
        doc["spec"][key] = {"name": "org/model"}
        add(f"spec:unknown-field-{key}", doc, "spec")
    add("top:spec-list", job(spec=[], name="t-spec-list"), "spec")
    add("top:spec-missing", {**API, "metadata": {"name": "t-nospec"}}, "spec")

    # continuing from a parent, and tracking
    def model(**fields) -> dict:
        spec = copy.deepcopy(FULL_SPEC)
        spec["model"] = {k: v for k, v in {**spec["model"], **fields}.items() if v is not None}
        return job(spec)

    add("parent:checkpoint", model(fromJob=None, fromCheckpoint="s3://bucket/ft/a/checkpoints"))
    add("parent:continue-adapter", model(mergeParent=False))
    add(
        "parent:both",
        model(fromCheckpoint="s3://bucket/a/checkpoints/step-00000200"),
        "spec.model.fromCheckpoint",
    )
    add("parent:merge-without-parent", model(fromJob=None), "spec.model.mergeParent")
    add("parent:job-name-invalid", model(fromJob="Chat_V1"), "spec.model.fromJob")
    add(
        "parent:checkpoint-credentials",
        model(fromJob=None, fromCheckpoint="s3://KEY:SECRET@bucket/a"),
        "spec.model.fromCheckpoint",
    )
    add("parent:no-base-model", model(name=None, revision=None, ggufFile=None), "spec.model")
    qlora = copy.deepcopy(FULL_SPEC)
    qlora["method"]["type"] = "qlora"
    add("parent:merge-into-qlora", job(qlora), "spec.model.mergeParent")

    # clean, leak-free data (spec.dataset.clean)
    clean = "spec.dataset.clean"
    add("clean:defaults", mutate(clean, {}))
    add("clean:redact", mutate(clean, {"action": "redact", "pii": ["email", "phone"]}))
    add("clean:redact-default-kinds", mutate(clean, {"action": "redact"}))
    add("clean:report-no-pii", mutate(clean, {"action": "report", "pii": []}))
    add("clean:exact-only", mutate(clean, {"nearDuplicateThreshold": 1.0}))
    add("clean:redact-no-pii", mutate(clean, {"action": "redact", "pii": []}), f"{clean}.pii")
    add("clean:pii-repeated", mutate(clean, {"pii": ["email", "email"]}), f"{clean}.pii")
    add("clean:pii-unknown", mutate(clean, {"pii": ["ssn"]}), f"{clean}.pii[0]")
    add("clean:action-unknown", mutate(clean, {"action": "fix"}), f"{clean}.action")
    add(
        "clean:threshold-low",
        mutate(clean, {"nearDuplicateThreshold": 0.3}),
        f"{clean}.nearDuplicateThreshold",
    )

    # data mixtures (spec.dataset.mixture)
    mix = "spec.dataset.mixture"

    def mixed(path: str, value: Any) -> dict:
        return _set(mixture_job(), path, value)

    add("mixture:weights", mixture_job())
    add("mixture:temperature", _set(mixed(f"{mix}[0].weight", DELETE), f"{mix}[1].weight", DELETE))
    add(
        "mixture:and-train",
        mixed("spec.dataset.train", {"uri": "s3://bucket/t.jsonl"}),
        "spec.dataset.train",
    )
    add("mixture:neither", mixed(mix, DELETE), "spec.dataset.train")
    add("mixture:one-source", mixed(mix, [{"id": "chat", "uri": "s3://bucket/c.jsonl"}]), mix)
    add("mixture:ids-repeated", mixed(f"{mix}[1].id", "chat"), mix)
    add("mixture:id-invalid", mixed(f"{mix}[1].id", "Math-QA"), f"{mix}[1].id")
    add("mixture:weight-on-one", mixed(f"{mix}[1].weight", DELETE), mix)
    add("mixture:weight-zero", mixed(f"{mix}[1].weight", 0), f"{mix}[1].weight")
    add("mixture:uri-and-name", mixed(f"{mix}[0].name", "org/chats"), "spec.dataset.mixture")
    add(
        "mixture:with-validation",
        mixed("spec.dataset.validation", {"uri": "s3://bucket/v.jsonl"}),
        "spec.dataset.validation",
    )
    add("mixture:with-clean", mixed("spec.dataset.clean", {}), "spec.dataset.clean")
    add("mixture:format-for-dpo", mixed(f"{mix}[1].format", "preference"), mix)
    add(
        "mixture:temperature-zero",
        mixed("spec.dataset.mixtureTemperature", 0),
        "spec.dataset.mixtureTemperature",
    )

    # classification heads (spec.method.task classification)
    def classifier(*changes: tuple[str, Any]) -> dict:
        doc = classification_job()
        for path, v in changes:
            # the values are shared between cases (DELETE is a marker: kept as it is)
            _set(doc, path, copy.deepcopy(v) if isinstance(v, (dict, list)) else v)
        return doc

    fmt, task, method = "spec.dataset.format", "spec.method.task", "spec.method"
    full = {"task": "classification", "objective": "sft", "type": "full"}
    as_full = ((method, full), ("spec.output.mergeAdapter", False))
    no_lora_sweep = ("spec.sweep.parameters", dict(_LR_ONLY))
    add("classification:lora", classifier())
    add("classification:full", classifier(*as_full, no_lora_sweep))
    add(
        "classification:full-head-only",
        classifier(*as_full, no_lora_sweep, (f"{method}.full", {"trainableLayers": []})),
    )
    add("classification:chat-data", classifier((fmt, "chat")), fmt)
    add(
        "classification:data-for-generation",
        classifier(
            (task, "generation"),
            ("spec.earlyStopping.metric", "eval_loss"),
            ("spec.earlyStopping.mode", "min"),
            ("spec.sweep.metric", "eval_loss"),
            ("spec.sweep.mode", "min"),
        ),
        task,
    )
    add(
        "classification:distill",
        classifier((f"{method}.objective", "distill")),
        f"{method}.objective",
    )
    add(
        "classification:qlora",
        classifier((f"{method}.type", "qlora"), ("spec.model.mergeParent", False)),
        f"{method}.type",
    )
    add(
        "classification:head-frozen",
        classifier(*as_full, no_lora_sweep, (f"{method}.full", {"trainHead": False})),
        f"{method}.full.trainHead",
    )
    for path, value in (
        ("spec.evaluation.generation", {"examples": 4}),
        ("spec.evaluation.retention", {"dataset": {"uri": "s3://bucket/general.jsonl"}}),
        ("spec.output.interpolation", {"weights": [0.5, 1.0]}),
    ):
        add(f"classification:{path.rsplit('.', 1)[1]}", classifier((path, value)), path)
    add(
        "classification:gguf",
        classifier(("spec.output.gguf", {"types": ["q8_0"]})),
        "spec.output.gguf",
    )
    add(
        "classification:parent", classifier(("spec.model.fromJob", "chat-v1")), "spec.model.fromJob"
    )
    add(
        "classification:mixture",
        classifier(
            *((f"spec.dataset.{k}", DELETE) for k in ("train", "validation", "clean")),
            (
                "spec.dataset.mixture",
                [{"id": "a", "uri": "s3://bucket/a.jsonl"}, {"id": "b", "name": "o/b"}],
            ),
        ),
        "spec.dataset.mixture",
    )
    add(
        "classification:token-metric",
        classifier(("spec.earlyStopping.metric", "eval_token_accuracy")),
        "spec.earlyStopping.metric",
    )

    # structured pruning (spec.model.prune)
    prune = "spec.model.prune"

    def pruned(value: Any, *changes: tuple[str, Any]) -> dict:
        doc = mutate(prune, value)
        for path, v in changes:
            _set(doc, path, v)
        return doc

    add("prune:layers-ok", pruned({"layers": [0, 1, 2, 29]}))
    add("prune:one-layer", pruned({"layers": [5]}))
    add("prune:keep-and-layers", pruned({"keepLayers": 3, "layers": [0, 1, 2]}), prune)
    add("prune:neither", pruned({}), prune)
    add("prune:layers-repeated", pruned({"layers": [0, 1, 1, 2]}), f"{prune}.layers")
    add("prune:layers-decreasing", pruned({"layers": [3, 1]}), f"{prune}.layers")
    add("prune:layers-negative", pruned({"layers": [-1, 2]}), f"{prune}.layers")
    add("prune:layers-empty", pruned({"layers": []}), f"{prune}.layers")
    add("prune:layers-too-many", pruned({"layers": list(range(257))}), f"{prune}.layers")
    add("prune:layers-max", pruned({"layers": list(range(256))}))
    add("prune:keep-zero", pruned({"keepLayers": 0}), f"{prune}.keepLayers")
    no_merge = (("spec.output.mergeAdapter", False), ("spec.output.gguf", DELETE))
    add(
        "prune:lora-without-merge",
        pruned({"keepLayers": 15}, *no_merge),
        "spec.output.mergeAdapter",
    )
    full_doc = pruned({"keepLayers": 15}, *no_merge, ("spec.model.mergeParent", False))
    full_doc["spec"]["method"] = {"objective": "sft", "type": "full"}
    full_doc["spec"]["sweep"]["parameters"].pop("method.lora.r")
    add("prune:full-without-merges", full_doc)
    add(
        "prune:parent-adapter-continues",
        pruned({"keepLayers": 15}, ("spec.model.mergeParent", False)),
        "spec.model.mergeParent",
    )
    q = pruned({"keepLayers": 15}, ("spec.method.type", "qlora"), ("spec.model.mergeParent", False))
    q["spec"]["model"].pop("fromJob")
    add("prune:qlora-without-parent", q)

    # which layers train (spec.method.full, spec.method.lora.layers)
    def full(settings: dict) -> dict:
        return _set(full_job(), "spec.method.full", settings)

    add("full:head-only", full({"trainableLayers": [], "trainHead": True}))
    add("full:defaults", full({}))
    add(
        "full:trains-nothing",
        full({"trainableLayers": [], "trainEmbeddings": False, "trainHead": False}),
        "spec.method.full.trainableLayers",
    )
    add(
        "full:layers-repeated",
        full({"trainableLayers": [3, 3]}),
        "spec.method.full.trainableLayers",
    )
    add("full:decay-zero", full({"layerLrDecay": 0}), "spec.method.full.layerLrDecay")
    add("full:unfreeze-empty", full({"unfreeze": {}}), "spec.method.full.unfreeze")
    add(
        "full:with-lora",
        _set(job(), "spec.method.full", {"layerLrDecay": 0.9}),
        "spec.method.full",
    )
    add(
        "lora:layers-empty",
        _set(job(), "spec.method.lora.layers", []),
        "spec.method.lora.layers",
    )
    add(
        "lora:layers-decreasing",
        _set(job(), "spec.method.lora.layers", [5, 2]),
        "spec.method.lora.layers",
    )
    for cid, mlflow, where in (
        ("tracking:uri-not-http", {"trackingUri": "ftp://mlflow.example"}, "trackingUri"),
        ("tracking:uri-credentials", {"trackingUri": "https://u:p@mlflow.example"}, "trackingUri"),
        (
            "tracking:uri-query-token",
            {"trackingUri": "https://mlflow.example/?access_token=abc"},
            "trackingUri",
        ),
        (
            "tracking:uri-fragment-token",
            {"trackingUri": "https://mlflow.example/#access_token=abc"},
            "trackingUri",
        ),
        ("tracking:uri-missing", {"experiment": "chat"}, "trackingUri"),
        (
            "tracking:secret-name-invalid",
            {"trackingUri": "http://m", "secretRef": {"name": "A_B"}},
            "secretRef.name",
        ),
    ):
        add(cid, mutate("spec.tracking.mlflow", mlflow), f"spec.tracking.mlflow.{where}")
    add("tracking:none", mutate("spec.tracking", DELETE))
    # objectives and the data they train on
    add("dpo:ok", dpo_job())
    add("dpo:chat-data", _set(dpo_job(), "spec.dataset.format", "chat"), "spec.dataset.format")
    add(
        "dpo:preference-data-sft",
        _set(dpo_job(), "spec.method.objective", "sft"),
        "spec.method",
    )
    add(
        "dpo:settings-on-sft",
        mutate("spec.method.dpo", {"beta": 0.1}),
        "spec.method.dpo",
    )
    add(
        "dpo:smoothing-on-hinge",
        _set(dpo_job(), "spec.method.dpo.lossType", "hinge"),
        "spec.method.dpo.labelSmoothing",
    )
    add("dpo:beta-zero", _set(dpo_job(), "spec.method.dpo.beta", 0), "spec.method.dpo.beta")
    add(
        "dpo:loss-unknown",
        _set(dpo_job(), "spec.method.dpo.lossType", "kto"),
        "spec.method.dpo.lossType",
    )
    add("grpo:ok", grpo_job())
    add("grpo:chat-data", _set(grpo_job(), "spec.dataset.format", "chat"), "spec.dataset.format")
    add(
        "grpo:prompt-data-sft",
        _set(grpo_job(), "spec.method.objective", "sft"),
        "spec.method",
    )
    add("grpo:no-settings", _set(grpo_job(), "spec.method.grpo", DELETE), "spec.method.grpo")
    add(
        "grpo:settings-on-sft",
        mutate("spec.method.grpo", grpo_job()["spec"]["method"]["grpo"]),
        "spec.method.grpo",
    )
    add(
        "grpo:completion-fills-max-seq-length",
        _set(grpo_job(), "spec.method.grpo.maxNewTokens", 2048),
        "spec.method.grpo.maxNewTokens",
    )
    add(
        "grpo:group-of-one",
        _set(grpo_job(), "spec.method.grpo.generationsPerPrompt", 1),
        "spec.method.grpo.generationsPerPrompt",
    )
    add(
        "grpo:loss-unknown",
        _set(grpo_job(), "spec.method.grpo.lossType", "dapo"),
        "spec.method.grpo.lossType",
    )
    add(
        "grpo:perplexity-early-stopping",
        _set(grpo_job(), "spec.earlyStopping.metric", "eval_perplexity"),
        "spec.earlyStopping.metric",
    )
    add(
        "dpo:perplexity-early-stopping",
        _set(dpo_job(), "spec.earlyStopping.metric", "eval_perplexity"),
        "spec.earlyStopping.metric",
    )
    d = "spec.method.distill"
    add("distill:ok", distill_job())
    add("distill:sequence-ok", _set(distill_job(), f"{d}.mode", "sequence"))
    add("distill:teacher-default", _set(distill_job(), f"{d}.teacher", DELETE))
    add("distill:teacher-uri", _set(distill_job(), f"{d}.teacher", {"uri": "s3://models/teacher"}))
    add(
        "distill:teacher-name-and-uri",
        _set(distill_job(), f"{d}.teacher.uri", "s3://models/teacher"),
        f"{d}.teacher",
    )
    add("distill:teacher-from-job", _set(distill_job(), f"{d}.teacher", {"fromJob": "teacher"}))
    add(
        "distill:teacher-from-job-and-uri",
        _set(distill_job(), f"{d}.teacher", {"fromJob": "teacher", "uri": "s3://models/t"}),
        f"{d}.teacher",
    )
    add(
        "distill:teacher-from-job-and-revision",
        _set(distill_job(), f"{d}.teacher", {"fromJob": "teacher", "revision": "main"}),
        f"{d}.teacher",
    )
    add(
        "distill:teacher-from-job-bad-name",
        _set(distill_job(), f"{d}.teacher", {"fromJob": "Teacher_1"}),
        f"{d}.teacher.fromJob",
    )
    add(
        "distill:preference-data",
        _set(distill_job(), "spec.dataset.format", "preference"),
        "spec.method.objective",
    )
    add(
        "distill:sequence-on-text",
        _set(_set(distill_job(), f"{d}.mode", "sequence"), "spec.dataset.format", "text"),
        "spec.dataset.format",
    )
    add("distill:on-policy-ok", _set(distill_job(), f"{d}.onPolicyFraction", 0.25))
    add(
        "distill:on-policy-sequence",
        _set(_set(distill_job(), f"{d}.mode", "sequence"), f"{d}.onPolicyFraction", 0.25),
        f"{d}.onPolicyFraction",
    )
    add(
        "distill:on-policy-on-text",
        _set(_set(distill_job(), f"{d}.onPolicyFraction", 0.5), "spec.dataset.format", "text"),
        "spec.dataset.format",
    )
    add(
        "distill:on-policy-answer-fills-max-seq-length",
        _set(_set(distill_job(), f"{d}.onPolicyFraction", 1.0), f"{d}.maxNewTokens", 4096),
        f"{d}.maxNewTokens",
    )
    add(
        "distill:answer-fills-max-seq-length",
        _set(_set(distill_job(), f"{d}.mode", "sequence"), f"{d}.maxNewTokens", 2048),
        f"{d}.maxNewTokens",
    )
    add("distill:settings-on-sft", mutate(d, {"mode": "logits"}), d)
    add("distill:weight-above-one", _set(distill_job(), f"{d}.weight", 1.5), f"{d}.weight")
    add("distill:temperature-zero", _set(distill_job(), f"{d}.temperature", 0), f"{d}.temperature")
    add("distill:loss-unknown", _set(distill_job(), f"{d}.loss", "jsd"), f"{d}.loss")
    add(
        "sft:agreement-early-stopping",
        mutate("spec.earlyStopping.metric", "eval_agreement"),
        "spec.earlyStopping.metric",
    )
    add(
        "distill:agreement-mode-min",
        _set(distill_job(), "spec.earlyStopping.mode", "min"),
        "spec.earlyStopping.mode",
    )
    add("kto:ok", kto_job())
    add(
        "kto:preference-data",
        _set(kto_job(), "spec.dataset.format", "preference"),
        "spec.dataset.format",
    )
    add("kto:chat-data", _set(kto_job(), "spec.dataset.format", "chat"), "spec.dataset.format")
    add(
        "kto:feedback-data-sft",
        _set(kto_job(), "spec.method.objective", "sft"),
        "spec.method",
    )
    dpo_on_feedback = _set(dpo_job(), "spec.dataset.format", "feedback")
    add("kto:feedback-data-dpo", dpo_on_feedback, "spec.dataset.format")
    add("kto:settings-on-sft", mutate("spec.method.kto", {"beta": 0.1}), "spec.method.kto")
    add(
        "kto:settings-on-dpo",
        _set(dpo_job(), "spec.method.kto", {"beta": 0.1}),
        "spec.method.kto",
    )
    add("kto:beta-zero", _set(kto_job(), "spec.method.kto.beta", 0), "spec.method.kto.beta")
    add(
        "kto:weight-zero",
        _set(kto_job(), "spec.method.kto.undesirableWeight", 0),
        "spec.method.kto.undesirableWeight",
    )
    add(
        "kto:weight-negative",
        _set(kto_job(), "spec.method.kto.desirableWeight", -1.0),
        "spec.method.kto.desirableWeight",
    )
    add(
        "kto:dpo-metric-early-stopping",
        _set(kto_job(), "spec.earlyStopping.metric", "eval_reward_accuracy"),
        "spec.earlyStopping.metric",
    )
    add(
        "kto:ranking-mode-min",
        _set(kto_job(), "spec.earlyStopping.mode", "min"),
        "spec.earlyStopping.mode",
    )
    add(
        "dpo:ranking-early-stopping",
        _set(dpo_job(), "spec.earlyStopping.metric", "eval_ranking_accuracy"),
        "spec.earlyStopping.metric",
    )
    add(
        "sft:reward-early-stopping",
        mutate("spec.earlyStopping.metric", "eval_reward_margin"),
        "spec.earlyStopping.metric",
    )
    no_held_out = mutate("spec.dataset.validationSplit", 0)
    del no_held_out["spec"]["dataset"]["validation"]
    del no_held_out["spec"]["dataset"]["test"]
    add("generation:no-held-out", no_held_out, "spec.evaluation.generation")
    add(
        "generation:text-format",
        mutate("spec.dataset.format", "text"),
        "spec.evaluation.generation",
    )
    add("dataset:test-both", mutate("spec.dataset.test.name", "org/x"), "spec.dataset.test")
    # sweeps: what can be searched, and over which values
    sw = "spec.sweep"
    params = f"{sw}.parameters"

    def sweep(**parameters: Any) -> dict:
        return mutate(params, parameters)

    def dist(kind: str, **fields: Any) -> dict:
        return {"distribution": kind, **fields}

    add("sweep:model-name", sweep(**{"model.name": dist("choice", values=[1])}), params)
    add("sweep:resources", sweep(**{"resources.workers": dist("intRange", low=1, high=4)}), params)
    add(
        "sweep:unknown-path",
        sweep(**{"hyperparameters.lr": dist("uniform", low=0.1, high=0.2)}),
        params,
    )
    add("sweep:seed", sweep(**{"hyperparameters.seed": dist("choice", values=[1, 2])}), params)
    add("sweep:empty", sweep(), params)
    lr = "hyperparameters.learningRate"
    add("sweep:lr-above-1", sweep(**{lr: dist("uniform", low=0.1, high=2)}), params)
    add("sweep:lr-zero-choice", sweep(**{lr: dist("choice", values=[0, 1e-4])}), params)
    add("sweep:lr-int-range", sweep(**{lr: dist("intRange", low=1, high=2)}), params)
    add("sweep:log-low-zero", sweep(**{lr: dist("logUniform", low=0, high=1e-3)}), f"{params}")
    add("sweep:low-above-high", sweep(**{lr: dist("uniform", low=1e-3, high=1e-5)}), params)
    add("sweep:low-equals-high", sweep(**{lr: dist("uniform", low=1e-3, high=1e-3)}), params)
    add("sweep:choice-with-low", sweep(**{lr: dist("choice", values=[1e-4], low=1e-5)}), params)
    add("sweep:range-without-high", sweep(**{lr: dist("uniform", low=1e-5)}), params)
    add(
        "sweep:range-with-values",
        sweep(**{lr: dist("logUniform", low=1e-5, high=1e-3, values=[1e-4])}),
        params,
    )
    add("sweep:choice-empty", sweep(**{lr: dist("choice", values=[])}), params)
    add("sweep:distribution-unknown", sweep(**{lr: dist("normal", low=1e-5, high=1e-3)}), params)
    add("sweep:distribution-missing", sweep(**{lr: {"low": 1e-5, "high": 1e-3}}), params)
    add("sweep:r-fraction", sweep(**{"method.lora.r": dist("choice", values=[8, 12.5])}), params)
    add("sweep:r-uniform", sweep(**{"method.lora.r": dist("uniform", low=4, high=64)}), params)
    add("sweep:r-zero", sweep(**{"method.lora.r": dist("intRange", low=0, high=8)}), params)
    add(
        "sweep:r-range-fraction",
        sweep(**{"method.lora.r": dist("intRange", low=4.5, high=8)}),
        params,
    )
    add(
        "sweep:batch-too-big",
        sweep(**{"hyperparameters.batchSize": dist("choice", values=[8, 5000])}),
        params,
    )
    add(
        "sweep:warmup-above-half",
        sweep(**{"hyperparameters.warmupRatio": dist("uniform", low=0, high=0.6)}),
        params,
    )
    add(
        "sweep:dropout-one",
        sweep(**{"method.lora.dropout": dist("choice", values=[0.1, 1])}),
        params,
    )
    add(
        "sweep:value-negative",
        sweep(**{"hyperparameters.weightDecay": dist("choice", values=[-0.1])}),
        params,
    )
    add("sweep:parallel-above-trials", mutate(f"{sw}.parallelTrials", 9), f"{sw}.parallelTrials")
    add("sweep:trials-zero", mutate(f"{sw}.trials", 0), f"{sw}.trials")
    add("sweep:algorithm-grid", mutate(f"{sw}.algorithm", "grid"), f"{sw}.algorithm")
    add("sweep:metric-train-loss", mutate(f"{sw}.metric", "train_loss"), f"{sw}.metric")
    add(
        "sweep:grace-zero",
        mutate(f"{sw}.earlyStopping.gracePeriod", 0),
        f"{sw}.earlyStopping.gracePeriod",
    )
    add(
        "sweep:reduction-one",
        mutate(f"{sw}.earlyStopping.reductionFactor", 1),
        f"{sw}.earlyStopping.reductionFactor",
    )
    no_eval = mutate("spec.evaluation.enabled", False)
    no_eval["spec"]["earlyStopping"]["enabled"] = False
    add("sweep:without-evaluation", no_eval, f"{sw}.metric")
    no_data = mutate("spec.dataset.validation", DELETE)
    no_data["spec"]["dataset"]["validationSplit"] = 0.0
    no_data["spec"]["earlyStopping"]["enabled"] = False
    add("sweep:without-eval-data", no_data, f"{sw}.metric")
    full = mutate("spec.method", {"type": "full"})
    full["spec"]["output"]["mergeAdapter"] = False
    add("sweep:lora-on-full", full, params)
    full_ok = copy.deepcopy(full)
    full_ok["spec"]["sweep"]["parameters"].pop("method.lora.r")
    add("sweep:full-lr-only", full_ok, None)  # a full fine-tune sweeps its learning rate
    # output.gguf converts a whole model: a full fine-tune's or the merged one
    no_merge = mutate("spec.output.mergeAdapter", False)
    add("gguf:lora-without-merge", no_merge, "spec.output.gguf")
    no_gguf = copy.deepcopy(no_merge)
    no_gguf["spec"]["output"].pop("gguf")
    add("gguf:absent-without-merge", no_gguf, None)
    add("gguf:on-full", full_ok, None)
    add(
        "gguf:type-twice",
        mutate("spec.output.gguf.types", ["q8_0", "q4_0", "q8_0"]),
        "spec.output.gguf.types",
    )
    every_type = ["f16", "q8_0", "q5_0", "q4_1", "q4_0"]
    add("gguf:every-type", mutate("spec.output.gguf.types", every_type), None)
    every = {
        "hyperparameters.learningRate": dist("logUniform", low=1e-6, high=1),
        "hyperparameters.batchSize": dist("intRange", low=1, high=4096),
        "hyperparameters.warmupRatio": dist("uniform", low=0, high=0.5),
        "hyperparameters.weightDecay": dist("choice", values=[0, 1]),
        "hyperparameters.gradientAccumulationSteps": dist("choice", values=[1, 4096]),
        "method.lora.r": dist("choice", values=[1, 1024]),
        "method.lora.alpha": dist("intRange", low=1, high=4096),
        "method.lora.dropout": dist("uniform", low=0, high=0.99),
    }
    add("sweep:every-field-at-its-bounds", sweep(**every), None)
    no_mode = mutate(f"{sw}.mode", DELETE)
    add("sweep:mode-default", no_mode, None)
    # a mode against its metric's direction (the objectives table's)
    es = "spec.earlyStopping"
    add("es:loss-maximised", mutate(f"{es}.mode", "max"), f"{es}.mode")
    accuracy = mutate(f"{es}.metric", "eval_token_accuracy")
    add("es:accuracy-minimised", accuracy, f"{es}.mode")
    add("es:accuracy-mode-default", _set(copy.deepcopy(accuracy), f"{es}.mode", DELETE))
    add("es:accuracy-maximised", _set(copy.deepcopy(accuracy), f"{es}.mode", "max"))
    add("dpo:reward-minimised", _set(dpo_job(), f"{es}.mode", "min"), f"{es}.mode")
    add("sweep:loss-maximised", mutate(f"{sw}.mode", "max"), f"{sw}.mode")
    add(
        "sweep:perplexity-maximised",
        _set(mutate(f"{sw}.metric", "eval_perplexity"), f"{sw}.mode", "max"),
        f"{sw}.mode",
    )
    add("sweep:accuracy-minimised", mutate(f"{sw}.metric", "eval_token_accuracy"), f"{sw}.mode")
    # a metric the job's objective never reports
    add(
        "sweep:dpo-metric-on-sft",
        _set(copy.deepcopy(no_mode), f"{sw}.metric", "eval_reward_accuracy"),
        f"{sw}.metric",
    )
    dpo_sweep = _set(dpo_job(), f"{sw}.mode", DELETE)
    add(
        "dpo:sweep-perplexity",
        _set(copy.deepcopy(dpo_sweep), f"{sw}.metric", "eval_perplexity"),
        f"{sw}.metric",
    )
    add(
        "dpo:sweep-reward-accuracy",
        _set(copy.deepcopy(dpo_sweep), f"{sw}.metric", "eval_reward_accuracy"),
    )

    # ASHA's grace period (given or defaulted) against the steps: Ray refuses
    # grace_period > max_t when the sweep starts, on a running cluster
    def steps(n: int, *changes: tuple[str, Any]) -> dict:
        doc = mutate("spec.hyperparameters.epochs", DELETE)
        _set(doc, "spec.hyperparameters.maxSteps", n)
        for path, value in changes:
            _set(doc, path, value)
        return doc

    grace = f"{sw}.earlyStopping.gracePeriod"
    add("asha:grace-above-max-steps", steps(19), grace)
    add("asha:grace-equals-max-steps", steps(20))
    add(
        "asha:grace-from-evaluation-above-max-steps",
        steps(99, (grace, DELETE)),  # evaluation.everySteps 100
        grace,
    )
    add(
        "asha:grace-from-checkpoints-above-max-steps",
        steps(150, (grace, DELETE), ("spec.evaluation.everySteps", DELETE)),  # every 200
        grace,
    )
    add(
        "asha:grace-above-max-steps-without-early-termination",
        steps(10, (f"{sw}.earlyStopping.enabled", False)),
    )
    # cross-field rules through every generated mutation stay covered by rules tests;
    # here: the values a person is likely to try
    add(
        "rule:lora-on-cpu", mutate("spec.resources.gpusPerWorker", 0) | {}, None
    )  # lora on CPU is fine
    return c


# ---------------------------------------------------------------------------- graders

GRADER_AT = "spec.method.grpo.grader"
ALL_GRADERS: dict[str, Any] = {
    "type": "multi",
    "name": "all",
    "graders": {
        "exact": {
            "type": "stringCheck",
            "name": "exact",
            "input": "{{sample.output_text}}",
            "reference": "{{item.answer}}",
            "operation": "ilike",
        },
        "sim": {
            "type": "textSimilarity",
            "name": "sim",
            "input": "{{ sample.output_text }}",
            "reference": "{{item.answer}}",
            "evaluationMetric": "rougeL",
        },
        "fmt": {
            "type": "python",
            "name": "fmt",
            "source": "def grade(sample, item):\n    return 1.0\n",
            "timeoutSeconds": 5,
            "memoryMiB": 256,
            "maxConcurrency": 2,
        },
        "judge": {
            "type": "scoreModel",
            "name": "judge",
            "endpoint": "http://judge.serving:8000/v1",
            "model": "judge-model",
            "apiKeySecretRef": {"name": "judge-key", "key": "api-key"},
            "messages": [
                {"role": "system", "content": "Reply with one digit."},
                {"role": "user", "content": "{{sample.output_text}} vs {{item.answer}}"},
            ],
            "range": [0, 9],
            "maxTokens": 4,
            "temperature": 0,
            "maxRetries": 2,
            "timeoutSeconds": 30,
            "maxConcurrency": 4,
        },
    },
    "weights": {"exact": 1.0, "sim": 0.5, "fmt": 0.25, "judge": 0.1},
}


def grader_job(grader: Any = None) -> dict:
    """FULL_SPEC as a GRPO job scored by `grader` (default: a multi grader of every type)."""
    doc = job()
    spec = doc["spec"]
    spec["dataset"]["format"] = "prompt"
    spec["evaluation"].pop("calibration")  # answer tokens only
    spec["method"]["objective"] = "grpo"
    spec["method"]["grpo"] = {"grader": copy.deepcopy(ALL_GRADERS if grader is None else grader)}
    return doc


def grader_cases() -> list[Case]:
    """Generated mutations of every grader field (the multi grader's own and each leaf
    type's), and the mistakes the grader rules are there for."""
    c: list[Case] = []
    schema = spec_schema()
    node = schema
    for key in GRADER_AT.split(".")[1:]:
        node = node["properties"][key]
    places = [(GRADER_AT, node, ALL_GRADERS)]
    leaf = node["properties"]["graders"]["additionalProperties"]
    places += [(f"{GRADER_AT}.graders.{k}", leaf, v) for k, v in ALL_GRADERS["graders"].items()]
    seen: set[str] = set()  # one leaf type's field is the same field in the others
    for where, schema_node, value in places:
        for path, sub in _leaves(schema_node, where, value):
            field = re.sub(r"\[\d+\]", "", path[len(where) :])
            if field in seen:
                continue
            seen.add(field)
            for label, bad in _variants(sub):
                c.append(Case(f"{path[5:]}:{label}", _set(grader_job(), path, bad)))
            c.append(Case(f"{path[5:]}:absent", _set(grader_job(), path, DELETE)))
            c.append(Case(f"{path[5:]}:null", _set(grader_job(), path, None)))

    def add(cid: str, field: Optional[str], value: Any, refuse: Optional[str] = "") -> None:
        doc = grader_job() if field is None else _set(grader_job(), f"{GRADER_AT}.{field}", value)
        where = f"{GRADER_AT}.{field}" if refuse == "" else refuse
        c.append(Case(f"grader:{cid}", doc, refuse=where))

    g = "graders"
    add("ok-every-type", None, None, None)
    for name, one in ALL_GRADERS["graders"].items():
        c.append(Case(f"grader:ok-alone-{name}", grader_job(one)))
    add("template-unknown-sample-field", f"{g}.exact.reference", "{{sample.text}}")
    add("template-nested-item-field", f"{g}.exact.input", "{{item.a.b}}")
    add("template-bare-braces", f"{g}.sim.reference", "{{ item }}")
    add("template-in-message", f"{g}.judge.messages[1].content", "{{sample.output}}")
    add("template-unclosed", f"{g}.exact.reference", "{{item.answer}")
    add("python-two-sources", f"{g}.fmt.file", "grade.py", f"{GRADER_AT}.{g}.fmt.source")
    add("python-no-source", f"{g}.fmt.source", DELETE)
    add("python-source-without-grade", f"{g}.fmt.source", "def score(s, i):\n    return 1\n")
    add("python-source-too-big", f"{g}.fmt.source", "def grade(s, i): pass\n" + "#" * 40000)
    fmt_file = {"type": "python", "name": "fmt", "file": "../grade.py"}
    add("python-file-up", f"{g}.fmt", fmt_file, f"{GRADER_AT}.{g}.fmt.file")
    add(
        "python-file-absolute",
        f"{g}.fmt",
        {**fmt_file, "file": "/etc/grade.py"},
        f"{GRADER_AT}.{g}.fmt.file",
    )
    add(
        "python-file-not-py",
        f"{g}.fmt",
        {**fmt_file, "file": "grade.sh"},
        f"{GRADER_AT}.{g}.fmt.file",
    )
    add("python-timeout-zero", f"{g}.fmt.timeoutSeconds", 0)
    add("python-timeout-long", f"{g}.fmt.timeoutSeconds", 601)
    add("python-memory-small", f"{g}.fmt.memoryMiB", 32)
    add("python-concurrency-zero", f"{g}.fmt.maxConcurrency", 0)
    add("python-operation", f"{g}.fmt.operation", "eq")
    add(
        "python-config-map-bad-key",
        f"{g}.fmt",
        {"type": "python", "name": "fmt", "configMapRef": {"name": "g", "key": "a b"}},
        f"{GRADER_AT}.{g}.fmt.configMapRef.key",
    )
    add("string-check-no-operation", f"{g}.exact.operation", DELETE)
    add("string-check-metric", f"{g}.exact.evaluationMetric", "bleu")
    add("similarity-no-metric", f"{g}.sim.evaluationMetric", DELETE)
    add("judge-range-reversed", f"{g}.judge.range", [1, 0])
    add("judge-range-empty", f"{g}.judge.range", [0, 0])
    add("judge-range-three", f"{g}.judge.range", [0, 1, 2])
    add("judge-endpoint-credentials", f"{g}.judge.endpoint", "http://user:pw@judge/v1")
    add("judge-endpoint-key-query", f"{g}.judge.endpoint", "http://judge/v1?api_key=abc")
    add("judge-no-messages", f"{g}.judge.messages", [])
    add("judge-role", f"{g}.judge.messages[0].role", "tool")
    add("judge-secret-uppercase", f"{g}.judge.apiKeySecretRef.name", "Judge")
    add("judge-secret-no-key", f"{g}.judge.apiKeySecretRef.key", DELETE)
    add("judge-no-endpoint", f"{g}.judge.endpoint", DELETE)
    add("judge-concurrency-high", f"{g}.judge.maxConcurrency", 33)
    add("weights-unknown-grader", "weights.nope", 1.0, f"{GRADER_AT}.weights")
    add("weights-huge", "weights.exact", 1e6, f"{GRADER_AT}.weights")
    add("entry-name-not-key", f"{g}.exact.name", "other", f"{GRADER_AT}.{g}")
    add("multi-name-of-a-leaf", "name", "exact")
    add(
        "multi-in-multi",
        f"{g}.inner",
        {"type": "multi", "name": "inner", "graders": {}},
        f"{GRADER_AT}.{g}",
    )
    add("multi-no-graders", g, {}, f"{GRADER_AT}.{g}")
    add(
        "multi-too-many",
        g,
        {f"g{i}": {**ALL_GRADERS[g]["exact"], "name": f"g{i}"} for i in range(9)},
        f"{GRADER_AT}.{g}",
    )
    add(
        "name-uppercase",
        f"{g}.exact",
        {**ALL_GRADERS[g]["exact"], "name": "Exact"},
        f"{GRADER_AT}.{g}",
    )
    add("name-underscore", "name", "all_of_them")
    add("name-too-long", "name", "a" * 41)
    add("type-unknown", "type", "regex", GRADER_AT)
    add("type-missing", "type", DELETE, GRADER_AT)
    c.append(
        Case("grader:missing", _set(grader_job(), GRADER_AT, DELETE), refuse="spec.method.grpo")
    )
    for i, case in enumerate(c):
        case.doc["metadata"]["name"] = f"gr-{i}"
    return c


def written_cases() -> list[Case]:
    cases = _written()
    # every written case gets its own name so the server and the CLI see distinct objects
    for i, case in enumerate(cases):
        meta = case.doc.get("metadata") if isinstance(case.doc, dict) else None
        if isinstance(meta, dict) and meta.get("name") == "ok":
            meta["name"] = f"w-{i}"
    return cases


def all_doc_cases() -> list[Case]:
    cases = spec_cases()
    for i, case in enumerate(cases):
        case.doc["metadata"]["name"] = f"g-{i}"
    return cases + written_cases() + grader_cases()


# ---------------------------------------------------------------------------- files

_HEAD = "apiVersion: kubetune.io/v1alpha1\nkind: FineTuneJob\nmetadata:\n  name: {name}\n"
_SPEC = (
    "spec:\n  model: {{name: org/model}}\n  dataset: {{train: {{uri: 's3://bucket/t.jsonl'}}}}\n"
    "  output: {{uri: 's3://bucket/out'}}\n"
)


def _file(name: str, extra: str = "", head: Optional[str] = None) -> bytes:
    text = (head if head is not None else _HEAD.format(name=name)) + _SPEC.format() + extra
    return text.encode()


def _bomb() -> bytes:
    lines = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    prev = "a"
    for name in "bcdefghi":
        lines.append(f"{name}: &{name} [" + ",".join([f"*{prev}"] * 9) + "]")
        prev = name
    return ("\n".join(lines) + "\n").encode()


def yaml_cases() -> list[Case]:
    """Files whose bytes are the problem; kubectl reads these itself."""
    y = []

    def add(cid: str, data: bytes, refuse: Optional[str] = None) -> None:
        y.append(Case(cid, yaml=data, refuse=refuse))

    add("yaml:workers-float-4.0", _file("y1", "  resources: {workers: 4.0}\n"))
    add("yaml:workers-1e3", _file("y2", "  resources: {workers: 1e3}\n"))
    add("yaml:workers-1e4", _file("y2b", "  resources: {workers: 1e4}\n"), "spec.resources.workers")
    tol = (
        "  resources:\n    tolerations: [{key: k, operator: Exists, effect: NoExecute, "
        "tolerationSeconds: %s}]\n"
    )
    add("yaml:toleration-seconds-int64-max", _file("y2c", tol % (2**63 - 1)))
    add(
        "yaml:toleration-seconds-int64-over",
        _file("y2d", tol % 2**63),
        "spec.resources.tolerations[0].tolerationSeconds",
    )
    # go-yaml reads it as a float; Go writes that float as -9223372036854776000,
    # outside int64: the API server sees a float.
    add(
        "yaml:toleration-seconds-int64-under",
        _file("y2e", tol % (-(2**63) - 1)),
        "spec.resources.tolerations[0].tolerationSeconds",
    )
    add(
        "yaml:toleration-seconds-1e30",
        _file("y2f", tol % "1e30"),
        "spec.resources.tolerations[0].tolerationSeconds",
    )
    add(
        "yaml:seed-float-huge",
        _file("y2g", "  hyperparameters: {seed: 1e300}\n"),
        "spec.hyperparameters.seed",
    )
    add("yaml:workers-1e1", _file("y3", "  resources: {workers: 1e1}\n"))
    add("yaml:workers-hex", _file("y4", "  resources: {workers: 0x10}\n"))
    add("yaml:workers-octal", _file("y5", "  resources: {workers: 010}\n"))
    add("yaml:workers-underscore", _file("y6", "  resources: {workers: 1_0}\n"))
    add(
        "yaml:workers-sexagesimal",
        _file("y7", "  resources: {workers: 1:30}\n"),
        "spec.resources.workers",
    )
    add("yaml:trust-y", _file("y8", "  suspend: y\n"))
    add("yaml:suspend-on", _file("y9", "  suspend: on\n"))
    add(
        "yaml:model-name-y",
        _file("y10", "  model: {name: n}\n").replace(b"  model: {name: org/model}\n", b""),
        "spec.model.name",
    )
    add(
        "yaml:label-date",
        _file("y11", head=_HEAD.format(name="y11") + "  labels: {released: 2024-01-02}\n"),
    )
    add(
        "yaml:label-number",
        _file("y12", head=_HEAD.format(name="y12") + "  labels: {version: 2}\n"),
        "metadata.labels",
    )
    add("yaml:label-int-key", _file("y13", head=_HEAD.format(name="y13") + "  labels: {1: one}\n"))
    add("yaml:label-bool-key", _file("y14", head=_HEAD.format(name="y14") + "  labels: {yes: x}\n"))
    # kubectl sends = as text, and = is not a label value
    add(
        "yaml:equals-value",
        _file("y15", head=_HEAD.format(name="y15") + "  labels: {op: =}\n"),
        "metadata.labels",
    )
    add(
        "yaml:nan",
        _file("y16", "  hyperparameters: {learningRate: .nan}\n"),
        "spec.hyperparameters.learningRate",
    )
    add(
        "yaml:inf",
        _file("y17", "  hyperparameters: {maxGradNorm: .inf}\n"),
        "spec.hyperparameters.maxGradNorm",
    )
    add(
        "yaml:deadline-beyond-int64",
        _file("y18", "  activeDeadlineSeconds: 99999999999999999999\n"),
        "spec.activeDeadlineSeconds",
    )
    bomb = "".join("    " + line + "\n" for line in _bomb().decode().splitlines())
    add("yaml:alias-bomb", _file("y19", "  x:\n" + bomb), "(yaml")
    add("yaml:small-alias", _file("y20", "  output: &o {uri: 's3://bucket/out'}\n"))
    add(
        "yaml:not-utf8",
        _file("y21", '  model: {name: "org/\xff"}\n').replace("\xff".encode(), b"\xff"),
        "spec.model.name",
    )
    add(
        "yaml:not-utf8-annotation",
        _file(
            "y21b", head=_HEAD.format(name="y21b") + '  annotations: {note: "caf\xe9"}\n'
        ).replace("\xe9".encode(), b"\xe9"),
    )
    add("yaml:utf16", _file("y22").decode().encode("utf-16"))
    add("yaml:control-char", _file("y23", '  model: {name: "a\x07"}\n'), "(yaml")
    add(
        "yaml:escaped-control-char",
        _file("y24").replace(b"name: org/model", b'name: "org/\\x07model"'),
        "spec.model.name",
    )
    add("yaml:deep", _file("y25", "  extra: " + "[" * 2000 + "]" * 2000 + "\n"), "")
    add("yaml:duplicate-key", _file("y26", "  suspend: true\n  suspend: false\n"))
    add("yaml:top-int-key", b"1: 2\n" + _file("y27"), "")
    add("yaml:name-list", _file("y28", head=_HEAD.replace("{name}", "[a, b]")), "metadata.name")
    add("yaml:name-number", _file("y29", head=_HEAD.replace("{name}", "1234")), "metadata.name")
    add("yaml:tab-indent", _file("y30").replace(b"  model", b"\tmodel"), "(yaml")
    add(
        "yaml:huge-int",
        _file("y31", "  resources: {workers: " + "9" * 400 + "}\n"),
        "spec.resources.workers",
    )
    add(
        "yaml:binary-tag",
        _file("y32", head=_HEAD.format(name="y32") + "  annotations: {a: !!binary aGVsbG8=}\n"),
    )
    return y


# Accepted by both, and why that is safe. A case accepted by both that is not
# listed here fails the agreement test: every acceptance is a decision.
SAFE: dict[str, str] = {}
SAFE["meta:labels-null"] = "a null metadata map reads as absent (labels: with nothing after it)"
SAFE["meta:annotations-null"] = "a null metadata map reads as absent, as labels"
SAFE["grader:ok-every-type"] = "a multi grader of every type, each field set once"
for _name in ("exact", "sim", "fmt", "judge"):
    SAFE[f"grader:ok-alone-{_name}"] = "one leaf grader on its own is a whole grader"
for _field in ("exact.input", "exact.reference", "judge.messages[0].content"):
    for _label, _reason in (
        ("newline", "a template is text for a model or a comparison: lines are fine"),
        ("tab", "a template is text for a model or a comparison: tabs are fine"),
        ("space-inside", "a template is text: spaces are fine"),
        ("blank", "a template of spaces is text like any other: it compares or prompts as written"),
    ):
        SAFE[f"method.grpo.grader.graders.{_field}:{_label}"] = _reason


def _safe(prefixes: tuple[str, ...], reason: str) -> None:
    for p in prefixes:
        SAFE[p] = reason


_safe(
    (
        "yaml:workers-float-4.0",
        "yaml:workers-1e1",
        "yaml:workers-hex",
        "yaml:workers-octal",
        "yaml:workers-underscore",
    ),
    "kubectl sends these as the integers 4, 10, 16, 8 and 10: the same job as written plainly",
)
_safe(("yaml:workers-1e3",), "kubectl reads 1e3 as the number 1000, within 1 to 1024")
_safe(
    ("yaml:toleration-seconds-int64-max",),
    "the largest int64: Kubernetes stores it; the pod is never evicted for the taint",
)
_safe(("yaml:trust-y", "yaml:suspend-on"), "YAML 1.1 booleans, read as true by kubectl too")
_safe(
    (
        "yaml:label-date",
        "yaml:label-int-key",
        "yaml:label-bool-key",
    ),
    "kubectl sends these as text ('2024-01-02', '1', 'true'): valid label keys and values",
)
_safe(("yaml:duplicate-key",), "kubectl keeps the last value of a repeated key, as the CLI does")
_safe(
    ("yaml:not-utf8-annotation",),
    "kubectl sends bytes that are not UTF-8 as U+FFFD; an annotation is free text (the CLI "
    "warns where the byte is)",
)
_safe(("yaml:small-alias",), "an alias used once: an ordinary YAML feature")
_safe(("yaml:utf16",), "UTF-16 with a byte-order mark is read by both")
_safe(("yaml:binary-tag",), "annotations are free text; the bytes arrive decoded")
_safe(("rule:lora-on-cpu",), "LoRA (not QLoRA) with bf16 trains on CPU")
_safe(("parent:checkpoint",), "a checkpoint URI as the parent, with the base model named")
_safe(("parent:continue-adapter",), "fromJob without mergeParent: the parent's adapter continues")
_safe(("tracking:none",), "tracking is optional")
_safe(("clean:defaults",), "dataset.clean with its defaults: report every kind of finding")
_safe(("clean:redact",), "redact with the PII kinds to redact named")
_safe(("clean:redact-default-kinds",), "redact with the default kinds: all four")
_safe(("clean:report-no-pii",), "a report of duplicates and leaks only: no PII scan")
_safe(("clean:exact-only",), "threshold 1.0 counts exact duplicates only")
_safe(("mixture:weights",), "two sources, weighted 3:1, one with its own format")
_safe(("mixture:temperature",), "no weights: mixtureTemperature sets the shares from the sizes")
_safe(("classification:lora",), "a classification head with LoRA, watched by macro-F1")
_safe(("classification:full",), "a classification head, every weight trained")
_safe(
    ("classification:full-head-only",),
    "no decoder layer trains, the new head does: a linear probe of the base",
)
_safe(("prune:layers-ok",), "layers to keep by index, increasing: the alternative to keepLayers")
_safe(
    ("full:head-only",),
    "no decoder layer trains, the head does: a probe of the head alone",
)
_safe(("full:defaults",), "method.full with its defaults: every weight at one rate")
_safe(("prune:one-layer",), "a single kept layer is a model (a very small one)")
_safe(("prune:layers-max",), "256 increasing indices: the list's longest form")
_safe(
    ("prune:full-without-merges",),
    "a full fine-tune saves the whole pruned model, and merges any parent adapter first",
)
_safe(
    ("prune:qlora-without-parent",),
    "QLoRA on a pruned base, the merged model saved: no parent adapter to line up",
)
_safe(
    tuple(f"uri:{f}:query-harmless" for f in _URI_FIELDS)
    + tuple(f"endpoint:{f}:query-harmless" for f in _ENDPOINT_FIELDS),
    "a query parameter whose name only starts like a credential's (tokenizer=, keys=) is "
    "no credential: names are matched whole",
)
_safe(("dpo:ok",), "a preference-tuning job with every DPO setting: the valid baseline")
_safe(("kto:ok",), "a job learning from thumbs up/down feedback with every KTO setting")
_safe(("grpo:ok",), "a GRPO job with every method.grpo setting: the valid baseline")
_safe(
    (
        "distill:ok",
        "distill:sequence-ok",
        "distill:teacher-default",
        "distill:teacher-uri",
        "distill:teacher-from-job",
        "distill:on-policy-ok",
    ),
    "distillation jobs: every method.distill setting, sequence mode, the default teacher "
    "(spec.model), a teacher from a folder of weights and one from another job",
)
_safe(
    ("sweep:full-lr-only",), "a full fine-tune's learning rate can be swept; only LoRA's fields not"
)
_safe(
    ("sweep:every-field-at-its-bounds",),
    "every sweepable field over its whole range: each value is one its field accepts",
)
_safe(("gguf:absent-without-merge",), "no GGUF asked for: an adapter alone is a valid output")
_safe(("gguf:on-full",), "a full fine-tune saves the whole model, which GGUF export converts")
_safe(("gguf:every-type",), "each GGUF type once: one file per type")
_safe(("sweep:mode-default",), "mode follows the metric: min for losses, max for accuracy")
_safe(
    ("es:accuracy-mode-default",),
    "mode follows the metric: max for an accuracy (the objectives table's direction)",
)
_safe(("es:accuracy-maximised",), "an accuracy maximised: the metric's own direction")
_safe(
    ("dpo:sweep-reward-accuracy",),
    "a DPO sweep ranks on a metric DPO reports, maximised as the table says",
)
_safe(
    ("asha:grace-equals-max-steps",),
    "Ray's ASHAScheduler takes a grace period up to max_t, the trial's steps",
)
_safe(
    ("asha:grace-above-max-steps-without-early-termination",),
    "without early termination there is no ASHA and no grace period",
)
_safe(
    tuple(
        f"quantity:{f}:{kind}"
        for f in _QUANTITY_FIELDS
        if f not in _BYTE_FIELDS
        for kind in ("fraction", "milli")
    ),
    "half a CPU (0.5 or 500m) is a CPU request Kubernetes schedules",
)
_safe(
    tuple(f"quantity:{f}:fraction-with-unit" for f in _BYTE_FIELDS),
    "0.5Gi is 512Mi of memory or disk: whole bytes, more than zero",
)
_safe(
    tuple(f"uri:{f}:bucket-ok-{label}" for f in _URI_FIELDS for label in GOOD_BUCKETS),
    "bucket names the stores hold: 3 and 63 characters, dotted names, '_' on Cloud Storage",
)


def safe_reason(case: Case) -> Optional[str]:
    if case.id in SAFE:
        return SAFE[case.id]
    for key, reason in GENERATED_SAFE.items():
        if case.id.endswith(key) or case.id == key:
            return reason
    return None


# Generated mutations that both accept, by the end of their id.
GENERATED_SAFE: dict[str, str] = {
    ":absent": "an optional field left out: its documented default (or no setting) applies",
    ":null": "the API server prunes a null field before defaulting, and so does the CLI: the "
    "same as leaving it out",
    ":at-min": "the bound is inclusive: the value is in range",
    ":at-max": "the bound is inclusive: the value is in range",
    "uri:space-inside": "spaces are legal in object keys and file names",
    "ggufFile:space-inside": "spaces are legal in file names",
    "fromCheckpoint:space-inside": "spaces are legal in object keys and file names",
    "experiment:space-inside": "MLflow experiment names may hold spaces",
    "tolerations[0].value:empty": "Kubernetes allows an empty toleration value: it matches "
    "taints that have no value",
}


def dump_json(case: Case) -> bytes:
    """A document case as a file: JSON is YAML that every parser reads alike."""
    return json.dumps(case.doc, ensure_ascii=True).encode()


# ---------------------------------------------------------------------------- the CLI's verdict


@dataclass
class Verdict:
    ok: bool
    paths: list[str]
    messages: list[str]


def cli_verdict(case: Case) -> Verdict:
    """What `kubetune validate` decides, in process (the CLI prints exactly this)."""
    from kubetune_api.validation import validate_document
    from kubetune_cli.loader import load_documents

    if case.yaml is not None:
        loaded = load_documents(case.yaml)
        errors = [loaded.error] if loaded.error else []
        docs = loaded.documents
        if not docs and not errors:
            return Verdict(False, ["(file)"], ["holds no YAML document"])
    else:
        errors, docs = [], [case.doc]
    for doc in docs:
        errors += validate_document(doc).errors
    return Verdict(not errors, [e.path for e in errors], [str(e) for e in errors])
