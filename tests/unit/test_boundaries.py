"""Source roots are not packages, and each package imports only what it may."""

import ast
import subprocess
import sys
from pathlib import Path

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


def test_test_module_names_are_unique_across_tiers():
    # Tiers have no __init__.py, so pytest imports test modules by basename:
    # two tests/*/test_x.py would break collection of the whole suite.
    names = [p.name for p in (REPO / "tests").rglob("test_*.py")]
    assert len(names) == len(set(names)), sorted(n for n in names if names.count(n) > 1)
