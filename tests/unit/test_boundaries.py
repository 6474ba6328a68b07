"""Source roots are not packages, and each package imports only what it may."""

import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

# package folder -> top-level modules it must never import (anywhere, even lazily)
FORBIDDEN = {
    "operator/kubetune_api": {
        "torch",
        "ray",
        "deepspeed",
        "transformers",
        "peft",
        "kopf",
        "kubernetes",
        "yaml",
        "fsspec",
    },
    "operator/kubetune_operator": {"torch", "ray", "deepspeed", "transformers", "peft"},
    "operator/kubetune_openai": {"torch", "ray", "deepspeed", "transformers", "peft", "kopf"},
    "trainer/kubetune_trainer": {"kopf", "kubernetes"},
}


def _imports(folder: Path):
    for path in sorted(folder.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    yield path, alias.name.split(".")[0]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                yield path, node.module.split(".")[0]


def test_operator_folder_is_not_a_package_and_stdlib_operator_still_works():
    assert not (REPO / "operator" / "__init__.py").exists()
    assert not (REPO / "trainer" / "__init__.py").exists()
    code = "import operator, numbers; print(operator.itemgetter(1)([5, 7]), operator.__file__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0, out.stderr
    value, origin = out.stdout.split()
    assert value == "7" and "kubetune" not in origin and not origin.startswith(str(REPO))


def test_no_package_imports_what_it_must_not():
    checked = 0
    for folder, banned in FORBIDDEN.items():
        root = REPO / folder
        if not root.exists():
            continue
        for path, module in _imports(root):
            checked += 1
            assert module not in banned, f"{path.relative_to(REPO)} imports {module}"
    assert checked > 0


def test_api_package_loads_only_pydantic_and_stdlib():
    code = (
        "import sys; before = set(sys.modules); import kubetune_api, kubetune_api.crd; "
        "new = {m.split('.')[0] for m in set(sys.modules) - before}; "
        "std = set(sys.stdlib_module_names); "
        "print(sorted(m for m in new if m not in std and not m.startswith('_')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    third_party = set(eval(out.stdout))  # a printed list of names
    third_party -= {"kubetune_api"}
    assert third_party <= {
        "pydantic",
        "pydantic_core",
        "typing_extensions",
        "annotated_types",
        "typing_inspection",
    }, third_party


def test_cli_validate_does_not_load_heavy_stacks():
    code = (
        "import sys; from kubetune_cli.main import main; "
        "main(['validate', 'crds/examples/quickstart.yaml']); "
        "print([m for m in ('torch', 'ray', 'kopf', 'kubernetes') if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_operator_loads_no_typed_kubernetes_api_classes():
    # rest.py: CoreV1Api and NetworkingV1Api import their pydantic models when
    # first touched, ~80 MiB resident in the operator process.
    code = (
        "import sys; from kubernetes.client import ApiClient, Configuration; "
        "import kubetune_operator.handlers, kubetune_operator.leader; "
        "from kubetune_operator.kube import Api; "
        "Api(ApiClient(Configuration(host='https://127.0.0.1:1'))); "
        "print(sorted(m for m in sys.modules if m.startswith('kubernetes.client.api.')), "
        "sum(m.startswith('kubernetes.client.models.') for m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    apis, models = out.stdout.strip().rsplit("] ", 1)
    assert apis == "[", apis
    assert int(models) < 10  # kopf's V1ObjectMeta and V1OwnerReference and what they use


def test_test_module_names_are_unique_across_tiers():
    # Tiers have no __init__.py, so pytest imports test modules by basename:
    # two tests/*/test_x.py would break collection of the whole suite.
    names = [p.name for p in (REPO / "tests").rglob("test_*.py")]
    assert len(names) == len(set(names)), sorted(n for n in names if names.count(n) > 1)


def _lint_imports(root: Path) -> subprocess.CompletedProcess:
    """import-linter with the contracts of root/pyproject.toml, on root's sources."""
    code = (
        "import sys; from importlinter.cli import lint_imports; "
        "sys.exit(lint_imports(config_filename='pyproject.toml', no_cache=True))"
    )
    env = {**os.environ, "PYTHONPATH": f"{root / 'operator'}{os.pathsep}{root / 'trainer'}"}
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=root, env=env
    )


def test_import_contracts_hold():
    # pyproject.toml [tool.importlinter]: kubetune_api below the operator, the trainer
    # and the CLI; the CLI never imports the trainer or the operator; the trainer's
    # modules in layers (no cycles); objectives independent of each other.
    proc = _lint_imports(REPO)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "0 broken" in proc.stdout and "4 kept" in proc.stdout, proc.stdout


@pytest.mark.parametrize(
    ("path", "line", "contract"),
    [
        # a cycle: data would import the recipe that imports it
        (
            "trainer/kubetune_trainer/data.py",
            "from . import recipe",
            "the trainer's modules import only downwards",
        ),
        # one objective leaning on another
        (
            "trainer/kubetune_trainer/objectives/sft.py",
            "from . import dpo",
            "an objective imports no other objective",
        ),
        # an arrow back up: the API importing the operator
        (
            "operator/kubetune_api/models.py",
            "import kubetune_operator.names",
            "the API package is below",
        ),
        # the CLI importing the trainer instead of running its registered command
        (
            "operator/kubetune_cli/run.py",
            "import kubetune_trainer.local",
            "the CLI reaches the trainer and the operator only through entry points",
        ),
    ],
)
def test_import_contracts_fail_on_a_wrong_arrow(tmp_path, path, line, contract):
    shutil.copy(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    for root in ("operator", "trainer"):
        shutil.copytree(REPO / root, tmp_path / root, ignore=shutil.ignore_patterns("__pycache__"))
    target = tmp_path / path
    target.write_text(target.read_text() + f"\n{line}  # noqa\n")
    proc = _lint_imports(tmp_path)
    assert proc.returncode != 0, proc.stdout
    broken = [ln for ln in proc.stdout.splitlines() if "BROKEN" in ln]
    assert len(broken) >= 1 and any(contract in ln for ln in broken), proc.stdout


OPERATOR = REPO / "operator" / "kubetune_operator"
# The operator's I/O modules, each importing only those after it: the flow
# (reconciler) uses the storage view and the Kubernetes client, never back.
OPERATOR_IO_LAYERS = ["handlers", "reconciler", "storage_view", "kube"]


def test_operator_io_modules_import_one_way():
    for i, module in enumerate(OPERATOR_IO_LAYERS):
        tree = ast.parse((OPERATOR / f"{module}.py").read_text())
        imported = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                if node.module:
                    imported.add(node.module.split(".")[0])
                else:
                    imported |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith(
                "kubetune_operator."
            ):
                imported.add(node.module.split(".")[1])
        above = set(OPERATOR_IO_LAYERS[: i + 1])
        assert not imported & above - {module}, f"{module}.py imports {imported & above}"


def test_status_is_written_from_one_place():
    # One reconcile, one status write (docs/operator.md): a single call site,
    # at the end of Reconciler._reconcile, and the API's status patch used
    # nowhere else.
    sites = []
    for path in sorted(OPERATOR.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.AsyncFunctionDef | ast.FunctionDef):
                for ref in ast.walk(node):  # a call, or a method handed to kube.call
                    if isinstance(ref, ast.Attribute) and ref.attr in (
                        "_write_status",
                        "patch_job_status",
                    ):
                        sites.append((path.name, node.name, ref.attr))
    assert sorted(sites) == [
        ("reconciler.py", "_reconcile", "_write_status"),
        ("reconciler.py", "_write_status", "patch_job_status"),
    ], sites
