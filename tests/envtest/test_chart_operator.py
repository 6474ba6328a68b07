"""The issue's proof: `helm install` into the real API server, then the operator acting
only as the chart's ServiceAccount (a real token from the TokenRequest API, no admin
rights) reconciles a FineTuneJob to its RayJob and writes its status.

A Forbidden anywhere in the operator's log fails the test: the chart's RBAC must cover
every call the operator makes (delete with the finalizer included)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from harness import wait_until
from operator_support import (
    OperatorProcess,
    apply,
    finetunejob,
    get,
    rayjob_finished,
    rayjob_running,
    s3_secret,
    wait_phase,
    wait_status,
)

pytestmark = pytest.mark.envtest
CHART = Path(__file__).resolve().parents[2] / "charts" / "kubetune"


def _service_account_kubeconfig(kube, namespace: str, sa: str, path: Path) -> Path:
    token = kube.kubectl("create", "token", sa, "-n", namespace, "--duration=1h").stdout.strip()
    config = yaml.safe_load(Path(kube.kubeconfig).read_text())
    for user in config["users"]:
        user["user"] = {"token": token}
    path.write_text(yaml.safe_dump(config))
    return path


def test_operator_as_the_charts_service_account(helm, kube, namespace, s3, tmp_path):
    release = "kubetune"
    helm(
        "install",
        release,
        str(CHART),
        "-n",
        namespace,
        "--set",
        f"watch.namespaces={{{namespace}}}",
        "--wait=false",
    )
    sa = kube.kubectl(
        "get",
        "deploy",
        release,
        "-n",
        namespace,
        "-o",
        "jsonpath={.spec.template.spec.serviceAccountName}",
    ).stdout
    assert sa == release
    kubeconfig = _service_account_kubeconfig(kube, namespace, sa, tmp_path / "sa.kubeconfig")
    who = kube.kubectl(f"--kubeconfig={kubeconfig}", "auth", "whoami", "-o", "json")
    assert json.loads(who.stdout)["status"]["userInfo"]["username"] == (
        f"system:serviceaccount:{namespace}:{sa}"
    )

    # As the chart runs it: one of its replicas, holding the Lease the chart's Role names.
    op = OperatorProcess(
        kube,
        [namespace],
        tmp_path,
        extra_env={"KUBECONFIG": str(kubeconfig)},
        lease_namespace=namespace,
        lease_name=release,
    )
    op.start()
    try:
        holder = wait_until(lambda: get(kube, "lease", release, namespace), 30, what="the Lease")[
            "spec"
        ]["holderIdentity"]
        assert holder, "the operator holds no Lease"
        s3_secret(kube, namespace, s3)
        apply(kube, namespace, finetunejob("via-chart", s3))
        st = wait_status(
            kube,
            "via-chart",
            namespace,
            lambda s: s.get("rayJobName"),
            90,
            "the RayJob name in status",
        )
        rayjob = wait_until(
            lambda: get(kube, "rayjob", st["rayJobName"], namespace), 60, what="the RayJob"
        )
        assert rayjob["metadata"]["ownerReferences"][0]["name"] == "via-chart"
        assert get(kube, "configmap", st["configMapName"], namespace) is not None

        rayjob_running(kube, st["rayJobName"], namespace)
        wait_phase(kube, "via-chart", namespace, "Running", 90)
        rayjob_finished(kube, st["rayJobName"], namespace)
        done = wait_phase(kube, "via-chart", namespace, "Succeeded", 90)
        assert done["observedGeneration"] == 1
        assert any(c["type"] == "Succeeded" and c["status"] == "True" for c in done["conditions"])

        kube.kubectl("delete", "finetunejob", "via-chart", "-n", namespace, "--wait=false")
        wait_until(
            lambda: get(kube, "finetunejob", "via-chart", namespace) is None,
            90,
            what="the FineTuneJob to be finalized and deleted",
        )
    finally:
        op.stop()
        log = op.log_path.read_text()
        print(f"--- operator log ({op.log_path})\n{op.log_tail(80)}")
        # Its ClusterRole is cluster-scoped: leave none behind for the next install.
        helm("uninstall", release, "-n", namespace)
    assert "Forbidden" not in log and " 403" not in log, op.log_tail(80)
