"""`kubetune validate` on the table of bad FineTuneJobs and on fuzzed input: it
never crashes, refuses with a field path and a bounded message, and refuses
every case the table says must be refused. tests/envtest/test_admission_agreement.py
checks the same cases against the real API server."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

from admission_cases import (
    FULL_SPEC,
    SAFE,
    Case,
    all_doc_cases,
    cli_verdict,
    dump_json,
    job,
    safe_reason,
    yaml_cases,
)
from kubetune_api.validation import validate_document
from kubetune_cli import loader
from kubetune_cli.loader import load_documents

REPO = Path(__file__).resolve().parents[2]
CASES = all_doc_cases() + yaml_cases()
MESSAGE_MAX = 700  # an error line never repeats a whole huge value


def test_the_table_is_broad():
    ids = [c.id for c in CASES]
    assert len(ids) == len(set(ids)), "case ids are unique"
    assert len(CASES) > 800
    # every kind of mistake appears for every type of field
    for label in ("str-digit", "bool", "list", "empty", "too-long", "bidi", "bell", "unknown"):
        assert any(i.endswith(":" + label) for i in ids), label


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_cli_verdict(case: Case):
    verdict = cli_verdict(case)  # raises on a crash
    if verdict.ok:
        assert case.refuse is None, f"{case.id}: accepted, must be refused at {case.refuse}"
        assert safe_reason(case), f"{case.id}: accepted: refuse it or say in SAFE why it is safe"
        return
    assert case.id not in SAFE, f"{case.id}: SAFE says it is accepted: {verdict.messages}"
    assert verdict.paths and all(verdict.paths), verdict.messages
    if case.refuse:
        assert any(p.startswith(case.refuse) for p in verdict.paths), (case.refuse, verdict)
    for message in verdict.messages:
        assert len(message) <= MESSAGE_MAX, message[:200]
        assert "\x07" not in message and "\u202e" not in message, "hostile text echoed raw"


def test_the_command_line_agrees_with_the_library_and_never_crashes(tmp_path):
    """One `kubetune validate -o json` over every case, each in its own file."""
    files = []
    for i, case in enumerate(CASES):
        path = tmp_path / f"{i:04d}.yaml"
        path.write_bytes(case.yaml if case.yaml is not None else dump_json(case))
        files.append(path)
    proc = subprocess.run(
        [sys.executable, "-m", "kubetune_cli", "validate", "-o", "json", *map(str, files)],
        capture_output=True,
        cwd=REPO,
        timeout=300,
    )
    assert proc.returncode == 1, proc.stderr.decode()[-2000:]
    assert b"Traceback" not in proc.stderr
    reports = json.loads(proc.stdout)
    by_file: dict[str, bool] = {}
    for report in reports:
        by_file[report["file"]] = by_file.get(report["file"], True) and report["valid"]
        for error in report["errors"]:
            assert len(error["message"]) <= MESSAGE_MAX
    for case, path in zip(CASES, files, strict=True):
        assert by_file[str(path)] == cli_verdict(case).ok, case.id
    assert len(proc.stdout) < 2_000_000, "the report repeats huge values"


def test_huge_value_is_not_echoed(tmp_path):
    doc = job()
    doc["spec"]["model"]["name"] = "x" * (1024 * 1024)
    doc["spec"]["resources"]["priorityClassName"] = "Y" * (1024 * 1024)
    path = tmp_path / "huge.yaml"
    path.write_text(json.dumps(doc))
    proc = subprocess.run(
        [sys.executable, "-m", "kubetune_cli", "validate", str(path)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
    )
    assert proc.returncode == 1
    assert "spec.model.name" in proc.stdout and "spec.resources.priorityClassName" in proc.stdout
    assert len(proc.stdout) < 3000, len(proc.stdout)


def test_exit_codes(tmp_path):
    good = tmp_path / "good.yaml"
    good.write_text(json.dumps(job()))
    bad = tmp_path / "bad.yaml"
    bad.write_text(json.dumps(job(name="Bad_Name")))

    def code(*files):
        return subprocess.run(
            [sys.executable, "-m", "kubetune_cli", "validate", *map(str, files)],
            capture_output=True,
            cwd=REPO,
            timeout=60,
        ).returncode

    assert code(good) == 0
    assert code(good, bad) == 1
    assert code(good, tmp_path / "missing.yaml") == 2
    assert code(tmp_path) == 2  # a folder cannot be read as a file


def test_yaml_errors_name_the_line():
    loaded = load_documents(b"apiVersion: v1\nkind: x\nspec:\n  a: \x07\n")
    assert loaded.error is not None
    assert loaded.error.path == "(yaml line 4, column 6)", loaded.error
    assert "U+0007" in loaded.error.message
    # not UTF-8: kubectl sends U+FFFD; the CLI does the same and says where
    loaded = load_documents(b"a: 1\nb: \xc3\x28\n")
    assert loaded.error is None and loaded.documents == [{"a": 1, "b": "\ufffd("}]
    assert loaded.warnings and loaded.warnings[0].startswith("line 2, column 4: byte 0xc3")


@pytest.mark.parametrize(
    "value, tag",
    [
        ("!!int ''", "int"),
        ("!!int 0x", "int"),
        ("!!float abc", "float"),
        ("!!timestamp x", "timestamp"),
    ],
)
def test_a_value_its_explicit_tag_cannot_hold_is_an_error_at_the_value(value, tag):
    """kubectl refuses these too (go-yaml cannot decode them); once PyYAML crashed."""
    loaded = load_documents(f"apiVersion: v1\nkind: x\nspec:\n  a: {value}\n".encode())
    assert loaded.error is not None
    assert loaded.error.path == "(yaml line 4, column 6)", loaded.error
    assert (
        f"is not a valid !!{tag}" in loaded.error.message
        and "remove the tag" in loaded.error.message
    )


def test_excessive_aliasing_is_refused_quickly():
    bomb = next(c for c in CASES if c.id == "yaml:alias-bomb")
    loaded = load_documents(bomb.yaml)
    assert loaded.error is not None and "excessive aliasing" in loaded.error.message


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("1e3", 1000.0),
        ("0x10", 16),
        ("010", 8),
        ("1_000", 1000),
        ("1:30", "1:30"),
        ("y", True),
        ("N", False),
        ("=", "="),
        ("2024-01-02", "2024-01-02"),
        (".5", 0.5),
        ("1.", 1.0),
        ("+12", 12),
        ("0b101", 5),
        ("9" * 400, "9" * 400),
    ],
)
def test_plain_scalars_read_as_kubectl_reads_them(text, value):
    loaded = load_documents(f"v: {text}\n".encode())
    assert loaded.error is None
    assert loaded.documents == [{"v": value}]


# libyaml reads most files; the pure parser reads the rest and words every error.
# Each input below is one where the two parsers differ, or an error.
_PURE_READS = [
    '{"a": "b",\t"c": 1}',  # libyaml takes the tab as a separator
    "a:\tb\n",
    "{a:b?}",  # libyaml does not end a plain scalar at ? inside {}
    "a: 1\n\ufeffb: 2\n",  # libyaml skips a byte-order mark at a line's start
    "a: !\n",  # libyaml: "", PyYAML: null
    "a: |-#c\n  x\n",  # libyaml takes a comment right after a block scalar's header
    "- |\n  x\n   y\n- >-\n  p\n  q\n",
    "a: \x07\n",
    "a: [1, 2\n",
    "a: 1\n  b: 2\n",
    "a: *x\n",
    "a: &x 1\nb: &x 2\n",
    "a: !!int ''x\n",
    "k" * 1025 + ": 1\n",
    "%YAML 2.0\n---\na: 1\n",
    "[" * 70 + "]" * 70,  # deeply nested: the pure reading's RecursionError decides
]
_FAST_READS = [
    "a: 1\nb: [y, 1e3, 0x10, .5, '1', ~, 2024-01-02]\n",
    "---\na: &x {b: 1}\nc: *x\n...\n---\n- x\n- - y\n  - z # c\n",
    "a: \"x\\ty\\u00e9\\/\"\nb: 'it''s'\nc: plain\n  folded\n",
    'a: b\r\nc: "d\r\n  e"\r\n',
    "<<: {m: 2}\nn: [3]\n",
    "k" * 1000 + ": 1\n",
    "%YAML 1.2\n---\na: 1\n",
    "[" * 64 + "]" * 64,
]


@pytest.mark.parametrize("text", _PURE_READS + _FAST_READS)
def test_libyaml_reads_as_the_pure_parser_reads(text):
    data = text.encode()
    reference = loader._load_pure(*loader.decode(data))
    assert repr(load_documents(data)) == repr(reference)
    fast = loader._load_fast(loader.decode(data)[0])
    assert (fast is None) == (text in _PURE_READS), "which parser reads it"
    if fast is not None:
        assert repr(fast) == repr(reference.documents)


# ---------------------------------------------------------------------------- fuzzing

_hostile = st.sampled_from(
    ["", " ", "a b", "\u202e", "\x00", "\n", "é", "💥", "x" * 300, "s3://", "a:b@c", "-1"]
)
_leaf = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=40),
    _hostile,
)
_json = st.recursive(
    _leaf,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(
            st.one_of(st.text(max_size=12), st.integers(), st.booleans()), inner, max_size=4
        ),
    ),
    max_leaves=12,
)


def _spec_paths(node, prefix=()):
    if isinstance(node, dict):
        for k, v in node.items():
            yield (*prefix, k)
            yield from _spec_paths(v, (*prefix, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield (*prefix, i)
            yield from _spec_paths(v, (*prefix, i))


SPEC_PATHS = list(_spec_paths(FULL_SPEC))


@st.composite
def mutated_jobs(draw):
    doc = job(name=draw(st.sampled_from(["ok", "a.b", "A", "x" * 254, "-x", "1"])))
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(SPEC_PATHS))
        value = draw(_json)
        node = doc["spec"]
        try:
            for part in path[:-1]:
                node = node[part]
            node[path[-1]] = value
        except (KeyError, IndexError, TypeError):
            pass  # an earlier mutation replaced the parent
    return doc


@seed(20261122)
@settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck))
@given(mutated_jobs())
def test_fuzzed_jobs_never_crash_the_cli(doc):
    result = validate_document(doc)
    assert result.ok or all(e.path for e in result.errors)
    for e in result.errors:
        assert len(str(e)) <= MESSAGE_MAX


@seed(20261122)
@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.one_of(st.binary(max_size=300), st.text(max_size=300).map(str.encode)))
def test_fuzzed_bytes_never_crash_the_loader(data):
    loaded = load_documents(b"apiVersion: kubetune.io/v1alpha1\n" + data)
    for doc in loaded.documents:
        validate_document(doc)


@seed(20261122)
@settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck))
@given(_json)
def test_fuzzed_documents_of_any_shape_never_crash(doc):
    validate_document(doc)
