"""A file of several FineTuneJobs: which run, in which order, and why.

`kubectl apply -f` of a file with an SFT job and a DPO job continuing it
(`spec.model.fromJob`) creates both, and the operator starts the second when
the first has succeeded. `kubetune run FILE` gives the same outcome on one
machine: `plan` orders the file's FineTuneJobs so that every job runs after the
in-file jobs it continues (parents first, otherwise in file order), and
`kubetune validate` reports the same problems: two documents with one
namespace/name, a chain of fromJob that loops, a --name the file does not hold.

Edges are the spec's references to another FineTuneJob: `spec.model.fromJob`
and a distillation teacher's `spec.method.distill.teacher.fromJob` (`REFERENCES`),
within the job's namespace. A fromJob naming a job that is not
in the file is the job's own business (kubetune run reuses a finished run of it
under the output folder, as for a single job).

`--name` picks one job; its in-file ancestors run before it (each one already
finished under the output folder is reused, not trained again), so a job is
never started before what it continues.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from .validation import FieldError

KIND = "FineTuneJob"
# (path in the spec, the field as a person reads it): references to another job
REFERENCES = (
    (("model", "fromJob"), "spec.model.fromJob"),
    (("method", "distill", "teacher", "fromJob"), "spec.method.distill.teacher.fromJob"),
)


@dataclass
class Entry:
    document: int  # 1-based position in the file (all documents counted)
    name: Optional[str]
    namespace: str
    doc: dict
    parents: list[tuple[str, str]] = field(default_factory=list)  # (field, parent name) in file

    @property
    def label(self) -> str:
        return f"{self.name} (document {self.document})"


@dataclass
class Plan:
    order: list[Entry] = field(default_factory=list)
    errors: list[tuple[int, FieldError]] = field(default_factory=list)  # (document, error)
    jobs: int = 0  # FineTuneJobs in the file

    @property
    def ok(self) -> bool:
        return not self.errors

    def describe(self) -> list[str]:
        """What runs, in order, and why each waits (lines for a console)."""
        lines = []
        for k, e in enumerate(self.order, start=1):
            why = "; ".join(f"after {p}: {f} names it" for f, p in e.parents)
            lines.append(f"  {k}. {e.name} (document {e.document})" + (f", {why}" if why else ""))
        return lines


def _get(doc: Any, path: tuple[str, ...]) -> Any:
    for key in ("spec", *path):
        if not isinstance(doc, dict):
            return None
        doc = doc.get(key)
    return doc


def references(doc: Any) -> list[tuple[str, str]]:
    """(field, job name) of every reference to another FineTuneJob in a document."""
    found = []
    for path, shown in REFERENCES:
        value = _get(doc, path)
        if isinstance(value, str) and value:
            found.append((shown, value))
    return found


def entries(docs: list[Any]) -> list[Entry]:
    """The FineTuneJobs among the documents, with their positions."""
    out = []
    for index, doc in enumerate(docs, start=1):
        if not isinstance(doc, dict) or doc.get("kind") != KIND:
            continue
        meta = doc.get("metadata") if isinstance(doc.get("metadata"), dict) else {}
        name = meta.get("name") if isinstance(meta.get("name"), str) else None
        namespace = meta.get("namespace") if isinstance(meta.get("namespace"), str) else None
        out.append(Entry(index, name, namespace or "default", doc))
    return out


def plan(docs: list[Any], name: Optional[str] = None, file: str = "FILE") -> Plan:
    """The jobs to run in dependency order (all of them, or `name` and its in-file
    ancestors), or the errors that stop anything from running."""
    jobs = entries(docs)
    result = Plan(jobs=len(jobs))
    if not jobs:
        result.errors.append(
            (0, FieldError("(file)", f"{file} holds no FineTuneJob", "add a kind: FineTuneJob"))
        )
        return result
    by_key: dict[tuple[str, str], Entry] = {}
    for e in jobs:
        if e.name is None:
            result.errors.append(
                (
                    e.document,
                    FieldError(
                        "metadata.name",
                        f"document {e.document} has no name",
                        "give every FineTuneJob in the file a metadata.name",
                    ),
                )
            )
            continue
        key = (e.namespace, e.name)
        if key in by_key:
            first = by_key[key]
            result.errors.append(
                (
                    e.document,
                    FieldError(
                        "metadata.name",
                        f"documents {first.document} and {e.document} are both FineTuneJob "
                        f"{e.namespace}/{e.name}",
                        "give each job its own metadata.name (the second would replace the "
                        "first on kubectl apply)",
                    ),
                )
            )
            continue
        by_key[key] = e
    for e in by_key.values():
        e.parents = [(f, p) for f, p in references(e.doc) if (e.namespace, p) in by_key]
    cycle = _find_cycle(by_key)
    if cycle:
        loop = " -> ".join(c.label for c in [*cycle, cycle[0]])
        for c in sorted(cycle, key=lambda c: c.document):
            result.errors.append(
                (
                    c.document,
                    FieldError(
                        "spec.model.fromJob",
                        f"the jobs continue each other in a loop: {loop}",
                        "a job can continue only a job that does not depend on it: remove "
                        "fromJob from the first job of the chain",
                    ),
                )
            )
    if name is not None:
        picked = [e for e in by_key.values() if e.name == name]
        if not picked:
            names = ", ".join(sorted({e.name for e in by_key.values()})) or "none"
            result.errors.append(
                (
                    0,
                    FieldError(
                        "--name",
                        f"{file} holds no FineTuneJob named {name!r} (it holds: {names})",
                        "pass one of those names, or leave --name out to run them all",
                    ),
                )
            )
        elif len(picked) > 1:
            where = ", ".join(f"{e.namespace}/{e.name} (document {e.document})" for e in picked)
            result.errors.append(
                (
                    0,
                    FieldError(
                        "--name",
                        f"{name!r} names FineTuneJobs in several namespaces: {where}",
                        "put them in separate files",
                    ),
                )
            )
    if result.errors:
        return result
    wanted = set(by_key)
    if name is not None:
        wanted = _ancestors(by_key, next(k for k, e in by_key.items() if e.name == name))
    result.order = _order([by_key[k] for k in by_key if k in wanted], by_key)
    return result


def _find_cycle(by_key: dict[tuple[str, str], Entry]) -> Optional[list[Entry]]:
    """One loop of in-file references (in file order from its first job), or None."""
    state: dict[tuple[str, str], int] = {}  # 1 on the path, 2 done

    def visit(key, path) -> Optional[list[Entry]]:
        state[key] = 1
        path.append(key)
        e = by_key[key]
        for _f, p in e.parents:
            pk = (e.namespace, p)
            if state.get(pk) == 1:
                return [by_key[k] for k in path[path.index(pk) :]]
            if pk not in state:
                found = visit(pk, path)
                if found:
                    return found
        path.pop()
        state[key] = 2
        return None

    for key in sorted(by_key, key=lambda k: by_key[k].document):
        if key not in state:
            found = visit(key, [])
            if found:
                return found
    return None


def _ancestors(by_key, key) -> set:
    seen = {key}
    todo = [key]
    while todo:
        e = by_key[todo.pop()]
        for _f, p in e.parents:
            pk = (e.namespace, p)
            if pk not in seen:
                seen.add(pk)
                todo.append(pk)
    return seen


def _order(chosen: list[Entry], by_key) -> list[Entry]:
    """Parents before children; among jobs that are ready, file order."""
    left = sorted(chosen, key=lambda e: e.document)
    done: set[tuple[str, str]] = set()
    out: list[Entry] = []
    while left:
        ready = next(
            e for e in left if all((e.namespace, p) in done for _f, p in e.parents)
        )  # no cycle (checked): one is always ready
        left.remove(ready)
        done.add((ready.namespace, ready.name))
        out.append(ready)
    return out


def dependents(order: list[Entry], failed: Entry) -> list[Entry]:
    """The jobs later in `order` that continue `failed`, directly or through others."""
    hit = {(failed.namespace, failed.name)}
    out = []
    for e in order:
        if any((e.namespace, p) in hit for _f, p in e.parents):
            hit.add((e.namespace, e.name))
            out.append(e)
    return out
