"""Graders: score samples (completions the model wrote) against their data rows.

`Graders(spec).score(samples, items)` returns a `Scores`: the grader's score per
sample (a multi grader's weighted sum) and each leaf grader's own, with the
samples whose grading raised (errors) or ran out of time (timeouts) counted;
those score 0 and never stop the job. The spec is kubetune_api.graders.Grader.

- stringCheck and textSimilarity run in this process (they are pure functions of
  two strings);
- python runs the user's grade(sample, item) in worker processes with a time and
  memory limit and no network (graders/python.py, graders/_worker.py);
- scoreModel asks an OpenAI-compatible chat endpoint (graders/score_model.py); its
  API key is the environment variable kubetune_api.graders.api_key_env(name).

Every call is bounded in time: a leaf grader's samples take at most its
timeoutSeconds each, maxConcurrency at a time.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from kubetune_api import graders as api
from kubetune_api.graders import render

from .python import ERROR, OK, TIMEOUT, PythonGrader
from .score_model import ScoreModelGrader


@dataclass
class Scores:
    total: list[float]  # per sample: the grader's score (multi: weighted sum)
    per_grader: dict[str, list[float]]  # per leaf grader name, per sample
    errors: dict[str, int]  # per leaf grader: samples whose grading raised (scored 0)
    timeouts: dict[str, int]  # per leaf grader: samples that ran out of time (scored 0)
    messages: dict[str, str] = field(default_factory=dict)  # per leaf: its last error


class GraderError(ValueError):
    """A grader cannot be set up (its source or API key is missing): a spec problem,
    reported before training starts."""


def _string_check(spec, sample: dict, item: dict) -> float:
    text, ref = render(spec.input, sample, item), render(spec.reference, sample, item)
    op = spec.operation
    if op == "eq":
        return float(text == ref)
    if op == "ne":
        return float(text != ref)
    if op == "like":
        return float(ref in text)
    return float(ref.lower() in text.lower())  # ilike


def _similarity(metric: str) -> Callable[[str, str], float]:
    if metric == "fuzzyMatch":
        return lambda text, ref: difflib.SequenceMatcher(None, text, ref).ratio()
    if metric == "bleu":
        import sacrebleu

        return lambda text, ref: sacrebleu.sentence_bleu(text, [ref]).score / 100.0
    if metric == "gleu":
        from nltk.translate.gleu_score import sentence_gleu

        return lambda text, ref: sentence_gleu([ref.split()], text.split())
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer([metric])
    return lambda text, ref: scorer.score(ref, text)[metric].fmeasure


class _InProcess:
    """stringCheck and textSimilarity: microseconds a sample, in this process."""

    def __init__(self, spec):
        self.spec = spec
        self.last_error: Optional[str] = None
        if spec.type == "stringCheck":
            self.fn = lambda s, i: _string_check(spec, s, i)
        else:
            measure = _similarity(spec.evaluation_metric)
            self.fn = lambda s, i: measure(render(spec.input, s, i), render(spec.reference, s, i))

    def score(self, samples: list[dict], items: list[dict]) -> list[tuple[float, str]]:
        out = []
        for sample, item in zip(samples, items, strict=True):
            try:
                out.append((float(self.fn(sample, item)), OK))
            except Exception as exc:  # noqa: BLE001 - a row the metric cannot read
                self.last_error = f"{type(exc).__name__}: {exc}"[:300]
                out.append((0.0, ERROR))
        return out

    def close(self) -> None:
        pass


def _read_text(path: str) -> str:
    if "://" in path and not path.startswith("file://"):
        import fsspec

        with fsspec.open(path, "rt", encoding="utf-8") as f:
            return f.read()
    return Path(path.removeprefix("file://")).read_text(encoding="utf-8")


def data_files(spec, environ: Optional[Mapping[str, str]] = None) -> dict:
    """Graders' keyword arguments for a job spec (kubetune_api models): a python
    grader's `file` is read beside the training data, on this machine or in object
    storage (with the dataset's endpoint and credentials)."""
    uri = spec.dataset.train_sources()[0].uri  # a mixture's: its first source's folder
    if not uri:
        return {"base_dir": None}
    from ..storage import filesystem

    def read_text(where: str) -> str:
        fs, path = filesystem(where, spec.dataset, "DATASET", environ)
        with fs.open(path, "rt", encoding="utf-8") as f:
            return f.read()

    fs, path = filesystem(uri, spec.dataset, "DATASET", environ)
    if fs.isdir(path):
        folder = uri
    elif "://" in uri:
        folder = uri.rsplit("/", 1)[0]
    else:
        folder = os.path.dirname(os.path.abspath(uri))
    return {"base_dir": folder, "read_text": read_text}


class Graders:
    """The grader of a job, ready to score. `base_dir`: the folder `file:` sources
    are relative to (the training data's folder; locally, the job file's folder
    when the data is a datasets name); `read_text`: how to read it there (for
    object storage, with the dataset's credentials); `environ`: where scoreModel
    API keys are read (default os.environ)."""

    def __init__(
        self,
        grader: Any,
        *,
        base_dir: Optional[str] = None,
        environ: Optional[Mapping[str, str]] = None,
        read_text: Callable[[str], str] = _read_text,
    ):
        self.spec = api.parse(grader)
        environ = os.environ if environ is None else environ
        self.weights: dict[str, float] = {}
        self.leaves: dict[str, Any] = {}
        try:
            for leaf in api.leaves(self.spec):
                self.weights[leaf.name] = (
                    (self.spec.weights or {}).get(leaf.name, 1.0)
                    if self.spec.type == "multi"
                    else 1.0
                )
                self.leaves[leaf.name] = self._build(leaf, base_dir, environ, read_text)
        except BaseException:
            self.close()
            raise
        self._pool = ThreadPoolExecutor(max(1, len(self.leaves)), thread_name_prefix="graders")

    def _build(self, leaf, base_dir, environ, read_text):
        if leaf.type in ("stringCheck", "textSimilarity"):
            return _InProcess(leaf)
        if leaf.type == "python":
            source = self._source(leaf, base_dir, read_text)
            return PythonGrader(
                leaf.name, source, leaf.timeout_seconds, leaf.memory_mib, leaf.max_concurrency
            )
        key = None
        if leaf.api_key_secret_ref is not None:
            var = api.api_key_env(leaf.name)
            key = environ.get(var)
            if not key:
                raise GraderError(
                    f"grader {leaf.name}: its API key is not set: set the environment "
                    f"variable {var} (on the cluster the operator fills it from "
                    f"apiKeySecretRef {leaf.api_key_secret_ref.name})"
                )
        return ScoreModelGrader(leaf, key)

    @staticmethod
    def _source(leaf, base_dir: Optional[str], read_text) -> str:
        if leaf.source is not None:
            return leaf.source
        if leaf.config_map_ref is not None:
            path = Path(api.configmap_mount(leaf.name)) / leaf.config_map_ref.key
            if not path.is_file():
                raise GraderError(
                    f"grader {leaf.name}: configMapRef's file {path} is not there: the "
                    "operator mounts it in the cluster; for kubetune run use file: (beside "
                    "the data) or source:"
                )
            return path.read_text(encoding="utf-8")
        if base_dir is None:
            raise GraderError(f"grader {leaf.name}: file: needs the data's folder")
        where = f"{base_dir.rstrip('/')}/{leaf.file}"
        try:
            return read_text(where)
        except (OSError, UnicodeDecodeError) as exc:
            raise GraderError(
                f"grader {leaf.name}: cannot read file {leaf.file} (at {where}): {exc}"
            ) from None

    def fields(self) -> set[str]:
        return api.fields(self.spec)

    def isolation(self) -> dict[str, Optional[str]]:
        """How each python grader's processes are kept off the network, once started."""
        return {n: g.isolation for n, g in self.leaves.items() if isinstance(g, PythonGrader)}

    def score(self, samples: list[dict], items: list[dict]) -> Scores:
        if len(samples) != len(items):
            raise ValueError(f"{len(samples)} samples but {len(items)} items")
        names = list(self.leaves)
        # the leaves side by side: the call takes as long as the slowest one
        results = list(self._pool.map(lambda n: self.leaves[n].score(samples, items), names))
        scores = Scores(
            total=[0.0] * len(samples),
            per_grader={},
            errors={},
            timeouts={},
        )
        for name, result in zip(names, results, strict=True):
            scores.per_grader[name] = [s for s, _ in result]
            scores.errors[name] = sum(kind == ERROR for _, kind in result)
            scores.timeouts[name] = sum(kind == TIMEOUT for _, kind in result)
            last = self.leaves[name].last_error
            if last and (scores.errors[name] or scores.timeouts[name]):
                scores.messages[name] = last
            for i, (value, _) in enumerate(result):
                scores.total[i] += self.weights[name] * value
        return scores

    def close(self) -> None:
        for leaf in self.leaves.values():
            leaf.close()
        pool = getattr(self, "_pool", None)
        if pool is not None:
            pool.shutdown(wait=False)

    def __enter__(self) -> Graders:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


__all__ = ["GraderError", "Graders", "Scores", "OK", "ERROR", "TIMEOUT"]
