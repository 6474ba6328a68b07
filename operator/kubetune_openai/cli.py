"""`kubetune api`: serve the OpenAI-compatible fine-tuning API.

Settings come from flags or environment variables (the chart sets the latter);
object-store credentials only from the environment (a Secret), never flags.
Importing this module is cheap: `kubetune validate` imports the CLI.
"""

from __future__ import annotations

import argparse
import os

ENV = "KUBETUNE_API_"


def _env(name: str, default=None):
    return os.environ.get(ENV + name) or default


def add_parser(sub) -> None:
    p = sub.add_parser(
        "api",
        help="serve the OpenAI-compatible fine-tuning API (/v1/files, /v1/fine_tuning/jobs)",
        description="OpenAI's /v1/files and /v1/fine_tuning/jobs on FineTuneJobs, each "
        "created with the caller's Kubernetes identity. See docs/openai-compatible.md.",
    )
    p.add_argument("--host", default=_env("HOST", "0.0.0.0"), help="address to listen on")
    p.add_argument("--port", type=int, default=int(_env("PORT", "8000")), help="port")
    p.add_argument(
        "--files-uri",
        default=_env("FILES_URI"),
        help="where uploads go, s3://bucket/prefix [KUBETUNE_API_FILES_URI]",
    )
    p.add_argument(
        "--output-uri",
        default=_env("OUTPUT_URI"),
        help="spec.output.uri of the jobs it creates [KUBETUNE_API_OUTPUT_URI]",
    )
    p.add_argument(
        "--endpoint",
        default=_env("STORAGE_ENDPOINT"),
        help="S3-compatible endpoint of that store [KUBETUNE_API_STORAGE_ENDPOINT]",
    )
    p.add_argument(
        "--region", default=_env("STORAGE_REGION"), help="its region [KUBETUNE_API_STORAGE_REGION]"
    )
    p.add_argument(
        "--job-secret",
        default=_env("JOB_SECRET"),
        help="Secret in each tenant namespace the jobs read the store with (their "
        "dataset/output secretRef) [KUBETUNE_API_JOB_SECRET]",
    )
    p.add_argument(
        "--catalog",
        default=_env("CATALOG"),
        help="NAMESPACE/NAME of the model catalog ConfigMap [KUBETUNE_API_CATALOG]",
    )
    p.add_argument(
        "--default-namespace",
        default=_env("DEFAULT_NAMESPACE"),
        help="namespace for callers that name none and are no ServiceAccount",
    )
    p.add_argument(
        "--token-audience",
        action="append",
        default=[a for a in (_env("TOKEN_AUDIENCES") or "").split(",") if a],
        help="audiences the TokenReview asks for (repeatable; default: the API server's)",
    )
    p.add_argument(
        "--max-upload-mib",
        type=int,
        default=int(_env("MAX_UPLOAD_MIB", "512")),
        help="upload limit",
    )
    p.add_argument("--kubeconfig", default=None, help="kubeconfig (default: in-cluster)")
    p.add_argument("--tls-cert", default=_env("TLS_CERT"), help="serve HTTPS with this cert")
    p.add_argument("--tls-key", default=_env("TLS_KEY"), help="... and this key")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import sys

    missing = [f for f in ("files_uri", "output_uri") if not getattr(args, f)]
    if missing:
        flags = ", ".join("--" + m.replace("_", "-") for m in missing)
        print(
            f"kubetune api: set {flags} (or KUBETUNE_API_FILES_URI / _OUTPUT_URI)", file=sys.stderr
        )
        return 2
    try:
        from aiohttp import web

        from .kube import Kube, load_config
        from .mapping import Settings
        from .server import App, make_app
        from .store import Store
    except ImportError as exc:
        print(
            f"kubetune api needs the operator extra ({exc.name} is missing): "
            "pip install 'kubetune[operator]'",
            file=sys.stderr,
        )
        return 2
    import logging
    import ssl

    level = os.environ.get("KUBETUNE_LOG_LEVEL", "INFO").upper()
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(message)s")
    # Request lines are logged by server.errors (without headers: tokens stay out).
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    settings = Settings(
        files_uri=args.files_uri,
        output_uri=args.output_uri.rstrip("/"),
        endpoint=args.endpoint,
        region=args.region,
        job_secret=args.job_secret,
    )
    state = App(
        kube=Kube(load_config(args.kubeconfig), args.catalog, args.token_audience),
        store=Store(args.files_uri, args.endpoint, args.region, os.environ),
        settings=settings,
        default_namespace=args.default_namespace,
        max_upload_bytes=args.max_upload_mib << 20,
    )
    context = None
    if args.tls_cert:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(args.tls_cert, args.tls_key)
    web.run_app(
        make_app(state),
        host=args.host,
        port=args.port,
        ssl_context=context,
        access_log=None,
        print=lambda *_: None,
    )
    return 0
