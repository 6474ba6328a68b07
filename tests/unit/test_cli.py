"""`kubetune validate` and `kubetune crd` as a user runs them."""

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

THREE_MISTAKES = """\
apiVersion: kubetune.io/v1alpha1
kind: FineTuneJob
metadata:
  name: three-mistakes
spec:
  model:
    name: org/model
  dataset:
    train:
      uri: s3://bucket/train.jsonl
    format: chatml
  hyperparameters:
    epochs: 2
    maxSteps: 100
    learningRte: 0.001
"""


def kubetune(*args, stdin=None):
    return subprocess.run(
        [sys.executable, "-m", "kubetune_cli", *args],
        capture_output=True,
        text=True,
        input=stdin,
        cwd=REPO,
        timeout=60,
    )


def test_examples_validate():
    examples = sorted(str(p) for p in (REPO / "crds/examples").glob("*.yaml"))
    proc = kubetune("validate", *examples)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"{len(examples)} valid, 0 invalid, 0 error(s)" in proc.stdout


def test_three_mistakes_three_errors_with_paths(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(THREE_MISTAKES)
    proc = kubetune("validate", str(bad))
    assert proc.returncode == 1
    lines = [line.strip() for line in proc.stdout.splitlines() if line.startswith("  ")]
    assert len(lines) == 3, proc.stdout
    assert lines[0].startswith("spec.dataset.format: 'chatml' is not allowed (hint: use one of")
    assert (
        lines[1]
        == "spec.hyperparameters.learningRte: unknown field (hint: did you mean learningRate?)"
    )
    assert lines[2].startswith("spec.hyperparameters: set either epochs or maxSteps, not both")
    assert "0 valid, 1 invalid, 3 error(s)" in proc.stdout


def test_json_output_multi_document(tmp_path):
    good = (REPO / "crds/examples/lora-minimal.yaml").read_text()
    both = tmp_path / "both.yaml"
    both.write_text(good + "\n---\n" + THREE_MISTAKES)
    proc = kubetune("validate", "--output", "json", str(both))
    assert proc.returncode == 1
    report = json.loads(proc.stdout)
    assert [(r["document"], r["name"], r["valid"]) for r in report] == [
        (1, "lora-minimal", True),
        (2, "three-mistakes", False),
    ]
    assert {e["path"] for e in report[1]["errors"]} == {
        "spec.dataset.format",
        "spec.hyperparameters.learningRte",
        "spec.hyperparameters",
    }
    assert report[1]["errors"][2]["rule"] == "epochs-xor-max-steps"


def test_yaml_syntax_error_names_the_line(tmp_path):
    broken = tmp_path / "broken.yaml"
    broken.write_text("spec:\n  model: [unclosed\n")
    proc = kubetune("validate", str(broken))
    assert proc.returncode == 1
    assert "(yaml line 3" in proc.stdout or "(yaml line 2" in proc.stdout, proc.stdout


def test_missing_file_and_wrong_kind(tmp_path):
    other = tmp_path / "pod.yaml"
    other.write_text("apiVersion: v1\nkind: Pod\nmetadata: {name: p}\nspec: {}\n")
    proc = kubetune("validate", str(tmp_path / "nope.yaml"), str(other))
    assert proc.returncode == 2  # a file that cannot be read at all
    assert "cannot read" in proc.stdout
    assert "kind: is 'Pod' (hint: use FineTuneJob)" in proc.stdout


def test_stdin():
    proc = kubetune("validate", "-", stdin=THREE_MISTAKES)
    assert proc.returncode == 1 and "3 error(s)" in proc.stdout


def test_crd_command_prints_the_committed_crd():
    proc = kubetune("crd")
    assert proc.returncode == 0
    assert proc.stdout == (REPO / "crds/kubetune.io_finetunejobs.yaml").read_text()


def test_console_script_is_installed():
    scripts = Path(sys.executable).parent
    proc = subprocess.run([str(scripts / "kubetune"), "--help"], capture_output=True, text=True)
    assert proc.returncode == 0
    for command in ("validate", "crd", "run", "operator"):
        assert command in proc.stdout
