"""`kubetune operator`: run the kopf operator with kubetune's settings, alone
or (`--leader-elect`) as one of several replicas of which only the holder of a
Lease acts (leader.py)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import threading

log = logging.getLogger("kubetune.operator")


def run_operator(args: argparse.Namespace) -> int:
    import kopf

    from . import handlers  # noqa: F401  (registers the handlers)

    namespaces = list(getattr(args, "namespace", None) or [])
    level = os.environ.get("KUBETUNE_LOG_LEVEL", "INFO").upper()  # the chart's logLevel
    if level not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise SystemExit(f"KUBETUNE_LOG_LEVEL={level!r}: use DEBUG, INFO, WARNING or ERROR")
    from .endpoints import ENV, Allowlist

    try:  # a bad allowlist stops the operator here, with the entry named
        Allowlist.from_env(os.environ.get(ENV))
    except ValueError as exc:
        raise SystemExit(str(exc)) from None
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(message)s")
    # kopf's own loggers follow the same level (kopf run's --verbose/--quiet do the same).
    logging.getLogger("kopf").setLevel(level)
    liveness = getattr(args, "liveness", None)
    elector = None
    # kopf's stop flag: an asyncio future of the loop kopf runs in (a
    # threading.Event would leave a thread blocked on it after a SIGTERM).
    loop = stop_flag = None
    if getattr(args, "leader_elect", False):
        elector = _elector(args)
        _wait_for_the_lease(elector, liveness)
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        stop_flag = loop.create_future()
        handlers.act_only_while(lambda: elector.leading, elector.release)
        elector.renew_forever(on_lost=lambda: _stop_acting(loop, stop_flag))
    try:
        kopf.run(
            loop=loop,
            standalone=bool(getattr(args, "standalone", False)),
            clusterwide=not namespaces,
            namespaces=namespaces,
            liveness_endpoint=liveness,
            stop_flag=stop_flag,
        )
    finally:
        if elector is not None and not elector.lost.is_set():
            elector.release()  # if kopf's cleanup did not: a standby takes over at once
    if elector is not None and elector.lost.is_set():
        return 1  # restarted by Kubernetes, as a standby
    return 0


def _elector(args: argparse.Namespace):
    from kubernetes import client, config

    from . import leader
    from .rest import Rest

    try:
        timing = leader.LeaseTiming.from_env()
    except ValueError as exc:
        raise SystemExit(str(exc)) from None
    namespace = getattr(args, "lease_namespace", None) or leader.own_namespace()
    if not namespace:
        raise SystemExit(
            "--leader-elect: no namespace for the Lease (not in a pod); pass --lease-namespace"
        )
    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()
    # Its own client (and connection pool): a renewal never queues behind reconciles.
    api = Rest(client.ApiClient(client.Configuration.get_default_copy()))
    name = getattr(args, "lease_name", None) or leader.DEFAULT_LEASE
    return leader.LeaderElector(api, namespace, name, leader.identity(), timing)


def _wait_for_the_lease(elector, liveness) -> None:
    """Standby until this replica holds the Lease; alive (and ready) meanwhile,
    with its metrics served (kubetune_leader 0)."""
    from . import leader, metrics

    port = int(os.environ.get("KUBETUNE_METRICS_PORT", "0") or 0)
    if port:
        metrics.serve(port)
    health = leader.StandbyHealth(liveness).start()
    try:
        elector.wait_until_leading()
    finally:
        health.stop()  # kopf serves the same endpoint from now on


def _stop_acting(loop: asyncio.AbstractEventLoop, stop_flag: asyncio.Future) -> None:
    """The Lease is lost: another replica may lead soon. kopf is told to stop
    and the process ends within EXIT_GRACE_SECONDS whatever it is doing
    (nothing it could still finish is worth a second leader)."""
    from .leader import EXIT_GRACE_SECONDS

    def stop() -> None:
        if not stop_flag.done():
            stop_flag.set_result("the leader Lease is lost")

    loop.call_soon_threadsafe(stop)
    timer = threading.Timer(EXIT_GRACE_SECONDS, os._exit, args=(1,))
    timer.daemon = True
    timer.start()
