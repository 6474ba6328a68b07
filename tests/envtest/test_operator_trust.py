"""The operator's trust rules on the real control plane, with the real operator:

- no confused deputy: with the operator's own AWS credentials in its
  environment, a job whose output endpoint is a server of the job author's
  choosing (a recording HTTP server here) gets no request signed with them;
  the job fails, and its status names the allowlist. Nor does a job whose
  Secret lacks the keys (the client must not fall back to the operator's). The
  same server does get the reads of a job that names its own keys, so the
  recorder is shown to record;
- ownership: a RayJob and a ConfigMap that someone else made under a job's
  child names make the job fail with NameConflict, and both are unchanged
  (resourceVersion and content) after the job's TTL has passed; a job deleted
  and re-created under its name gets children of its own.
"""

from __future__ import annotations

import http.server
import json
import threading
import time

import pytest

from harness import wait_until
from operator_support import (
    OperatorProcess,
    apply,
    condition,
    finetunejob,
    get,
    names,
    rayjob_running,
    wait_phase,
    wait_status,
)

pytestmark = pytest.mark.envtest

OPERATOR_KEY_ID = "AKIAOPERATOROWNKEY01"
JOB_KEY_ID = "AKIAJOBSOWNKEY000001"


class _Recorder(http.server.BaseHTTPRequestHandler):
    """Answers every request with an S3-style 403 and keeps its headers."""

    def log_message(self, *args) -> None:
        pass

    def _record(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
        self.server.seen.append(
            {"method": self.command, "path": self.path, "headers": dict(self.headers.items())}
        )
        body = b"<Error><Code>AccessDenied</Code><Message>recorded</Message></Error>"
        self.send_response(403)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = _record


@pytest.fixture
def recorder():
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Recorder)
    srv.seen = []
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield srv
    srv.shutdown()
    srv.server_close()


def test_operator_never_signs_a_request_to_a_tenants_endpoint(kube, namespace, recorder, tmp_path):
    endpoint = f"http://127.0.0.1:{recorder.server_address[1]}"
    op = OperatorProcess(
        kube,
        [namespace],
        tmp_path,
        extra_env={
            "AWS_ACCESS_KEY_ID": OPERATOR_KEY_ID,
            "AWS_SECRET_ACCESS_KEY": "operator-own-secret",
            "AWS_DEFAULT_REGION": "us-east-1",
        },
    ).start()
    try:
        kube.kubectl(
            "create",
            "secret",
            "generic",
            "own-keys",
            "-n",
            namespace,
            f"--from-literal=AWS_ACCESS_KEY_ID={JOB_KEY_ID}",
            "--from-literal=AWS_SECRET_ACCESS_KEY=job-own-secret",
        )
        deputy = finetunejob("deputy")
        deputy["spec"]["output"] = {"uri": "s3://runs/out", "endpoint": endpoint}
        own = finetunejob("own")
        own["spec"]["output"] = {
            "uri": "s3://runs/out",
            "endpoint": endpoint,
            "secretRef": {"name": "own-keys"},
        }
        # A Secret without the key pair must not make the client fall back to
        # the operator's own credentials either.
        kube.kubectl(
            "create", "secret", "generic", "hollow", "-n", namespace, "--from-literal=x=y"
        )  # fmt: skip
        hollow = finetunejob("hollow")
        hollow["spec"]["output"] = own["spec"]["output"] | {"secretRef": {"name": "hollow"}}
        apply(kube, namespace, deputy)
        apply(kube, namespace, own)
        apply(kube, namespace, hollow)

        st = wait_phase(kube, "deputy", namespace, "Failed")
        assert st["reason"] == "EndpointNotAllowed", st
        assert condition(st, "Validated")["reason"] == "EndpointNotAllowed"
        for said in (endpoint, "s3.*.amazonaws.com", "storage.endpointAllowlist", "secretRef"):
            assert said in st["message"], (said, st["message"])
        # Refused before anything was made: no RayJob, no ConfigMap, no pods to run.
        assert "deputy" not in names(kube, "rayjobs", namespace)
        assert "deputy-config" not in names(kube, "configmaps", namespace)

        # The job with its own keys is read from the same server, signed with its key.
        for name in ("own", "hollow"):
            wait_until(lambda n=name: get(kube, "rayjob", n, namespace), 60, what=f"RayJob {name}")
            rayjob_running(kube, name, namespace)
        wait_until(
            lambda: any(JOB_KEY_ID in json.dumps(r["headers"]) for r in recorder.seen),
            60,
            what="a read signed with the job's own key at the recording server",
        )
        st = wait_status(
            kube,
            "hollow",
            namespace,
            lambda s: (condition(s, "StorageReadable") or {}).get("status") == "False",
            60,
            "hollow's StorageReadable=False",
        )
        assert (
            "has no AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"
            in (condition(st, "StorageReadable")["message"])
        )
        time.sleep(3)  # three more polls of every job
        assert wait_phase(kube, "deputy", namespace, "Failed")["reason"] == "EndpointNotAllowed"
    finally:
        op.stop()
        print(f"--- operator log ({op.log_path})\n{op.log_tail(80)}")
    carrying = [r for r in recorder.seen if OPERATOR_KEY_ID in json.dumps(r)]
    assert carrying == [], carrying
    signed = [r["headers"].get("Authorization", "") for r in recorder.seen]
    assert signed and all(f"Credential={JOB_KEY_ID}/" in a for a in signed), signed


def _foreign(kube, namespace: str, obj: dict) -> dict:
    kube.kubectl("create", "-n", namespace, "-f", "-", input=json.dumps(obj))
    return get(kube, obj["kind"].lower(), obj["metadata"]["name"], namespace)


def test_objects_with_a_childs_name_are_never_adopted(kube, namespace, tmp_path):
    rayjob = _foreign(
        kube,
        namespace,
        {
            "apiVersion": "ray.io/v1",
            "kind": "RayJob",
            # A kubetune label proves nothing: anyone can write labels.
            "metadata": {"name": "taken", "labels": {"kubetune.io/job-uid": "not-a-uid"}},
            "spec": {"entrypoint": "python -c 'print(1)'", "suspend": True},
        },
    )
    cm = _foreign(
        kube,
        namespace,
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": "taken-config"},
            "data": {"config.json": '{"someone": "else"}'},
        },
    )
    op = OperatorProcess(kube, [namespace], tmp_path).start()
    try:
        apply(kube, namespace, finetunejob("taken", ttlSecondsAfterFinished=1))
        st = wait_phase(kube, "taken", namespace, "Failed")
        assert st["reason"] == "NameConflict", st
        for said in ("RayJob taken", "ConfigMap taken-config", "no owner", "never changes"):
            assert said in st["message"], (said, st["message"])
        assert "rayJobName" not in st and "configMapName" not in st
        wait_until(
            lambda: condition(
                get(kube, "finetunejob", "taken", namespace)["status"], "ChildrenDeleted"
            ),
            30,
            what="the job's TTL cleanup",
        )
        time.sleep(2)  # two more reconciles after the cleanup

        # Deleted and re-created under the same name: the earlier job's ConfigMap
        # is the garbage collector's (held here by a finalizer, so the test sees
        # the wait); the new job waits for it, then makes its own.
        kube.kubectl(
            "create", "-n", namespace, "-f", "-",
            input=json.dumps({
                "apiVersion": "v1",
                "kind": "ConfigMap",
                "metadata": {
                    "name": "again-config",
                    "finalizers": ["example.com/hold"],
                    "ownerReferences": [{
                        "apiVersion": "kubetune.io/v1alpha1", "kind": "FineTuneJob",
                        "name": "again", "uid": "0d1e2a3d-0000-4000-8000-000000000000",
                    }],
                },
                "data": {"config.json": "{}"},
            }),
        )  # fmt: skip
        apply(kube, namespace, finetunejob("again"))
        uid = get(kube, "finetunejob", "again", namespace)["metadata"]["uid"]
        st = wait_status(
            kube, "again", namespace,
            lambda s: "garbage collector" in (s.get("message") or ""), 60, "the wait",
        )  # fmt: skip
        assert st["phase"] == "Pending" and "again-config" in st["message"], st
        kube.kubectl(
            "patch", "configmap", "again-config", "-n", namespace, "--type=merge",
            "-p", '{"metadata":{"finalizers":null}}',
        )  # fmt: skip

        def own_configmap():
            cm = get(kube, "configmap", "again-config", namespace) or {}
            refs = (cm.get("metadata") or {}).get("ownerReferences") or []
            return cm if [r["uid"] for r in refs] == [uid] else None

        again_cm = wait_until(own_configmap, 60, what="the new job's own ConfigMap")
        assert f"/again/{uid}" in again_cm["data"]["config.json"]
        rj = get(kube, "rayjob", "again", namespace)
        assert [r["uid"] for r in rj["metadata"]["ownerReferences"]] == [uid]
    finally:
        op.stop()
        print(f"--- operator log ({op.log_path})\n{op.log_tail(80)}")
    for before in (rayjob, cm):
        kind, name = before["kind"].lower(), before["metadata"]["name"]
        after = get(kube, kind, name, namespace)
        assert after is not None, f"{kind} {name} was deleted"
        if kind == "configmap":  # nobody else writes it: not one byte changed
            assert after["metadata"]["resourceVersion"] == before["metadata"]["resourceVersion"]
            assert after == before
            continue
        # A KubeRay operator of the same test session may write the RayJob's status
        # (suspended, or refused) at any time: everything but status is compared.
        # The operator never writes a RayJob's status, and a change to its spec
        # would move `generation`.
        for field in (
            "uid",
            "generation",
            "labels",
            "annotations",
            "ownerReferences",
            "finalizers",
        ):
            assert after["metadata"].get(field) == before["metadata"].get(field), field
        assert after["spec"] == before["spec"]
