"""The server's life: bind, load, serve, drain, stop. ``switchboard serve`` runs it
(``server/serve_cmd.py``).

Start-up binds the gRPC port first, with the health service answering NOT_SERVING and
generation answering UNAVAILABLE, so orchestrators can watch it come up; then it loads
the base model (on a worker thread: the event loop keeps answering health checks), the
engine, the adapter cache and the ``preload`` adapters, and only then turns SERVING.

Shutdown (SIGTERM/SIGINT or :meth:`SwitchboardServer.shutdown`): health goes
NOT_SERVING, new calls get UNAVAILABLE, in-flight calls get ``grace_period_s`` to finish,
then the engine and the pollers stop; the process exits 0.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from protos.switchboard.v1 import switchboard_pb2 as pb
from protos.switchboard.v1 import switchboard_pb2_grpc as pb_grpc
from server.service.auth import KeyChecker
from server.service.calls import CallRunner, ServiceState
from server.service.config import ServerConfig
from server.service.daemon_thread import run_in_daemon_thread
from server.service.http_api import HttpApi, HttpServer
from server.service.metrics import ServiceMetrics
from server.service.servicer import SwitchboardServicer
from server.service.stack import Backend, base_model_id, build_stack
from server.service.tls import TlsFiles, cleartext_warning

log = logging.getLogger("switchboard.server")

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Switchboard"].full_name


class SwitchboardServer:
    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.state = ServiceState()
        self.metrics = ServiceMetrics()
        self.runner = CallRunner(self.state, KeyChecker(config.api_keys, config.admin_key),
                                 self.metrics, config)
        self.servicer = SwitchboardServicer(self.runner)
        self.http_api = HttpApi(self.runner, config)
        self.http = HttpServer(self.http_api)
        self.health = health.aio.HealthServicer()
        self.server: grpc.aio.Server | None = None
        self.port = 0
        self.metrics_port = -1
        self.http_port = -1
        self.engine: Any = None
        self.cache: Any = None
        self.watcher: Any = None
        self.backend: Backend | None = None
        self.routing: Any = None
        self.ready = asyncio.Event()
        self._stopped = asyncio.Event()
        self._drained = True
        """Whether the shutdown's drain ended every call in flight within the grace."""
        self._stop_polling = threading.Event()
        self._publish = threading.Lock()
        """Orders "the load publishes the engine" against "shutdown starts draining"."""
        self._poller: threading.Thread | None = None

    @property
    def address(self) -> str:
        return f"{self.config.host}:{self.port}"

    @property
    def http_url(self) -> str:
        """The OpenAI-compatible API's base URL ('' when it is off): https with TLS."""
        host = self.config.host
        host = f"[{host}]" if ":" in host else host
        scheme = "https" if self.config.tls_cert else "http"
        return f"{scheme}://{host}:{self.http_port}/v1" if self.http_port >= 0 else ""

    # -- start ---------------------------------------------------------------------------
    async def start(self) -> None:
        cfg = self.config
        options = [("grpc.max_receive_message_length", cfg.max_message_bytes),
                   ("grpc.max_send_message_length", cfg.max_message_bytes),
                   ("grpc.so_reuseport", 0)]
        self.server = grpc.aio.server(options=options)
        pb_grpc.add_SwitchboardServicer_to_server(self.servicer, self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), self.server)
        for service in ("", SERVICE_NAME):
            await self.health.set(service, health_pb2.HealthCheckResponse.NOT_SERVING)
        target = f"{cfg.host}:{cfg.port}"
        tls = TlsFiles.of(cfg)  # one certificate for both front-ends; checked before binding
        warning = cleartext_warning(cfg)
        if warning is not None:
            log.warning(warning)
        if tls is not None:
            credentials = grpc.ssl_server_credentials([(tls.key, tls.cert)])
            self.port = self.server.add_secure_port(target, credentials)
        else:
            self.port = self.server.add_insecure_port(target)
        await self.server.start()
        if cfg.metrics_port >= 0:
            self.metrics_port = self.metrics.serve(cfg.host, cfg.metrics_port)
        if cfg.http_port >= 0:
            self.http_port = await self.http.start(cfg.host, cfg.http_port, tls)
        log.info("listening (not serving until loaded)", extra={"fields": {
            "address": self.address, "tls": bool(cfg.tls_cert),
            "metrics_port": self.metrics_port, "http_port": self.http_port}})
        await self._load_off_loop()
        if self.state.draining:  # told to stop while loading
            return
        self.state.ready = True
        for service in ("", SERVICE_NAME):
            await self.health.set(service, health_pb2.HealthCheckResponse.SERVING)
        self.ready.set()
        log.info("serving", extra={"fields": {"address": self.address}})

    async def _load_off_loop(self) -> None:
        """Run :meth:`_load` on a daemon thread: unlike the loop's executor (joined at
        exit), it cannot keep a process that was told to stop alive until loading ends."""
        await run_in_daemon_thread(self._load, name="switchboard-load")

    def _load(self) -> None:
        """The backend (:meth:`_open_backend`), published to the front-ends and the
        poller unless shutdown began meanwhile (a worker thread)."""
        backend = self._open_backend()
        with self._publish:
            if self.state.draining:  # stopped while loading: nothing will serve
                backend.close()
                return
            self.backend = backend
            self.engine, self.cache, self.watcher = backend.engine, backend.cache, \
                backend.watcher
            self.routing = backend.routing
            self.runner.attach(backend.dispatcher)
            self.servicer.attach(backend.adapters)
            self.http_api.attach(backend.adapters, backend.model_id)
            self._poller = threading.Thread(target=self._poll, name="switchboard-poll",
                                            daemon=True)
            self._poller.start()

    def _open_backend(self) -> Backend:
        """This process's serving stack (``stack.build_stack``); a cluster's ingress
        overrides it with one that calls the replicas."""
        from server.adapters.watcher import AdapterWatcher

        stack = build_stack(self.config, self.metrics)
        watcher = AdapterWatcher(stack.cache)

        def poll() -> None:
            watcher.poll_now()
            stack.routing.check()

        def stop() -> None:
            stack.close(False, 10.0)

        return Backend(stack.dispatcher, stack.cache, base_model_id(stack.base.info.source),
                       poll, stop, routing=stack.routing, engine=stack.engine,
                       cache=stack.cache, watcher=watcher)

    def _poll(self) -> None:
        """The backend's poll (adapter folders, the routing table) every
        ``poll_interval_s``."""
        while not self._stop_polling.wait(self.config.poll_interval_s):
            try:
                if self.backend is not None:
                    self.backend.poll()
            except Exception:
                log.exception("poll failed")

    # -- stop ----------------------------------------------------------------------------
    async def shutdown(self, grace: float | None = None) -> bool:
        """Drain and stop; safe to call more than once. Whether every call in flight
        finished within the grace period (False: the rest were cancelled)."""
        if self.state.draining:
            await self._stopped.wait()
            return self._drained
        grace = self.config.grace_period_s if grace is None else grace
        with self._publish:  # a load finishing now either sees this or is stopped below
            self.state.draining = True
        log.info("draining", extra={"fields": {"in_flight": self.state.in_flight,
                                               "grace_s": grace}})
        await self.health.enter_graceful_shutdown()
        finished = await self.state.wait_idle(grace)
        self._drained = finished
        if not finished:
            log.warning("grace period over; cancelling the calls still running",
                        extra={"fields": {"in_flight": self.state.in_flight}})
        if self.server is not None:
            # A grace even when every call has finished: a stream's handler ends (and
            # counts as finished) before gRPC has sent its trailing OK status.
            await self.server.stop(2.0 if finished else 1.0)
        await self.http.stop()
        self._stop_polling.set()
        if self.backend is not None:
            await asyncio.to_thread(self.backend.close)
        self.metrics.close()
        log.info("stopped")
        self._stopped.set()
        return finished

    async def wait_stopped(self) -> None:
        await self._stopped.wait()


async def serve(config: ServerConfig, announce: bool = True) -> int:
    """Run until SIGTERM/SIGINT; the exit code (0 after a clean drain)."""
    server = SwitchboardServer(config)
    loop = asyncio.get_running_loop()
    stop_requested = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop_requested.set)
    start = asyncio.create_task(server.start())
    waiter = asyncio.create_task(stop_requested.wait())
    done, _ = await asyncio.wait({start, waiter}, return_when=asyncio.FIRST_COMPLETED)
    if start in done:
        start.result()  # start-up errors end here, with their message
        if announce:
            print(f"switchboard: serving on {server.address}"
                  + (f", metrics on http://{config.host}:{server.metrics_port}/metrics"
                     if server.metrics_port >= 0 else "")
                  + (f", OpenAI API on {server.http_url}" if server.http_url else ""),
                  flush=True)
        await waiter
    else:
        start.cancel()
    await server.shutdown()
    return 0
