"""A cluster without KubeRay's RayJob CRD: a clear condition and a backed-off
retry, then recovery once the CRD appears. Deletes and re-applies the session's
RayJob CRD, so it lives in its own module."""

from __future__ import annotations

import re
import time

import pytest

from harness import kuberay_crd_files, wait_until
from operator_support import OperatorProcess, apply, condition, finetunejob, get, wait_status

pytestmark = pytest.mark.envtest


def _errors(op: OperatorProcess) -> float:
    m = re.search(
        r'kubetune_reconcile_errors_total\{kind="kuberay_missing"\} ([0-9.]+)', op.metrics()
    )
    return float(m.group(1)) if m else 0.0


def test_missing_rayjob_crd_gives_condition_and_backed_off_retry(kube, namespace, tmp_path):
    crd = "customresourcedefinition/rayjobs.ray.io"
    kube.kubectl("delete", crd, "--wait=true", timeout=120)
    wait_until(
        lambda: kube.kubectl("get", crd, check=False).returncode != 0,
        60,
        what="the RayJob CRD to go",
    )
    op = OperatorProcess(kube, [namespace], tmp_path).start()
    try:
        try:
            apply(kube, namespace, finetunejob("noray"))
            st = wait_status(
                kube, "noray", namespace, lambda s: condition(s, "KubeRayAvailable"), 60
            )
            c = condition(st, "KubeRayAvailable")
            assert c["status"] == "False" and c["reason"] == "RayJobCRDNotFound"
            assert "install the KubeRay operator" in c["message"]
            assert st["rayJobName"] == "noray"  # recorded, waiting to be created
            assert op.healthy()
            # Backed off (1, 2, 4, 4 s ...): a handful of tries in 10 s, not a hot loop.
            first = _errors(op)
            time.sleep(10)
            tries = _errors(op) - first
            assert 1 <= tries <= 6, tries
        finally:
            [path] = [p for p in kuberay_crd_files() if p.name == "ray.io_rayjobs.yaml"]
            kube.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(path))
            established = "jsonpath={.status.conditions[?(@.type=='Established')].status}"
            wait_until(
                lambda: kube.kubectl("get", crd, "-o", established).stdout == "True",
                60,
                what="the RayJob CRD to be Established again",
            )
        wait_until(
            lambda: get(kube, "rayjob", "noray", namespace),
            60,
            what="the RayJob once the CRD is back",
        )
        st = wait_status(
            kube,
            "noray",
            namespace,
            lambda s: condition(s, "KubeRayAvailable")["status"] == "True",
            30,
        )
        assert st["phase"] in ("Starting", "Pending")
    finally:
        op.stop()
        print(op.log_tail(100))
