"""Run only by test_harness.py, in a subprocess (no test_ prefix: not collected)."""


def test_everything_starts(kube, kuberay, s3, namespace):
    assert kube.kubectl("get", "namespace", namespace).returncode == 0
    assert kuberay.server.alive()
    s3.fs.pipe(s3.url("x"), b"1")
