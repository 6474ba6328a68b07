"""`kubetune api`: OpenAI's fine-tuning surface (`/v1/files`, `/v1/fine_tuning/jobs`)
mapped onto FineTuneJobs, created with the caller's own Kubernetes identity.

mapping.py holds the pure functions (ids, statuses, request -> FineTuneJob,
FineTuneJob -> job object, events, checkpoints, pages, errors); datafile.py
checks uploads; kube.py and store.py do the I/O; server.py wires them to HTTP.
See docs/openai-compatible.md.
"""
