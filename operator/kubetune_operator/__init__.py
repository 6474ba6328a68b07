"""kubetune's operator: FineTuneJob → KubeRay RayJob, status from the cluster and storage.

`kopf run -m kubetune_operator` (or `kubetune operator`) registers the
handlers by importing this package. Never imports torch, ray or deepspeed.
"""

from . import handlers  # noqa: F401  (registers the kopf handlers)
