"""One process of a flow: fanfare's /metrics on FANFARE_METRICS_HOST, then `python -m bytewax.run`.

`fanfare run` starts every member as
`python -m flows.runtime.flow_process FLOW <bytewax.run options>`.
Bytewax 0.21's own API server (`BYTEWAX_DATAFLOW_API_ENABLED`) binds 0.0.0.0, with no setting to
change it (src/webserver/mod.rs). So by default (FANFARE_METRICS_SERVER=fanfare) this process
serves its Prometheus registry itself, on FANFARE_METRICS_HOST (127.0.0.1 unless set) and
FANFARE_METRICS_PORT: fanfare's metrics, `process_*` and `python_*`. What that leaves out is
Bytewax's Rust-side step metrics (`bytewax_*`) and `/dataflow`, which only Bytewax's server can
serve: FANFARE_METRICS_SERVER=bytewax starts that server instead (every interface).

The dataflow itself runs exactly as `python -m bytewax.run` runs it, in this process. When it
stops on an error a step logged (flows/runtime/step_errors.py), or on a panic of Bytewax's
cluster (a peer failed), this prints one line instead of a traceback, and exits 1.
"""

from __future__ import annotations

import logging
import runpy
import sys
from collections.abc import Sequence

from prometheus_client import REGISTRY, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4
from prometheus_client.registry import CollectorRegistry

from flows.registry import FLOW_PROCESS_MODULE, FLOWS
from flows.runtime.http_endpoint import BackgroundHTTPServer, QuietHandler
from flows.runtime.logs import configure_logging, log_started
from flows.runtime.step_errors import LoggedError, first_logged
from flows.runtime.supervisor import EXIT_CANNOT_START, EXIT_CONFIGURATION
from operators.config import ConfigError, load_settings
from operators.metrics import FLOW_INFO

MODULE = FLOW_PROCESS_MODULE


class MetricsServer(BackgroundHTTPServer):
    """`GET /metrics` (the Prometheus text format) from a background thread."""

    def __init__(self, host: str, port: int, registry: CollectorRegistry = REGISTRY) -> None:
        class Handler(QuietHandler):
            def do_GET(self) -> None:
                if self.path.split("?", 1)[0].rstrip("/") != "/metrics":
                    self.send_body(404, b"not found: try /metrics\n", "text/plain; charset=utf-8")
                    return
                try:
                    body = generate_latest(registry)
                except Exception as exc:  # a collector's bug must not kill the endpoint
                    self.send_body(500, f"{type(exc).__name__}: {exc}\n".encode(), "text/plain")
                    return
                # The classic text format: every Prometheus version reads it.
                self.send_body(200, body, CONTENT_TYPE_PLAIN_0_0_4)

        super().__init__(host, port, Handler, "fanfare-metrics")


def is_flow_process(argv: Sequence[str]) -> bool:
    """True for the argv of a flow process: this module's, or a plain `python -m bytewax.run`."""
    return MODULE in argv or "bytewax.run" in argv


def bytewax_argv(flow: str, options: Sequence[str]) -> list[str]:
    """`sys.argv` for `python -m bytewax.run` running this flow."""
    return ["bytewax.run", FLOWS[flow], *options]


def _is_panic(exc: BaseException) -> bool:
    """Bytewax's Rust side panicked (its traceback shows only this module and runpy)."""
    return type(exc).__name__ == "PanicException"


def stopped_line(exc: BaseException, first: LoggedError | None) -> str:
    """One line on why the dataflow stopped, printed instead of a second traceback.

    A step's error was logged with its traceback where it was raised (step_errors.py); what
    Bytewax raises then is that error again (one process) or, in a cluster, "Send thread panic"
    with the step's error lost. A cluster member whose peer failed ends with that panic too.
    """
    ended = f"Bytewax ended with {type(exc).__name__}: {exc}"
    if first is not None:
        return f"fanfare: the dataflow stopped: {first} (traceback logged above); {ended}"
    return (
        f"fanfare: the dataflow stopped: {ended}; no step of this process raised an error "
        "(a step's error is logged with its traceback by the member where it was raised)"
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Serve /metrics (unless Bytewax's server does), then run the flow until it returns."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] not in FLOWS:
        print(
            f"usage: python -m {MODULE} {{{','.join(FLOWS)}}} [bytewax.run options]; "
            "`fanfare run FLOW` starts it for you",
            file=sys.stderr,
        )
        return 2
    flow, options = args[0], args[1:]
    try:
        settings = load_settings()
    except ConfigError as exc:
        print(f"fanfare: {exc}", file=sys.stderr)
        return EXIT_CONFIGURATION
    server: MetricsServer | None = None
    if settings.metrics_server == "fanfare":
        try:
            server = MetricsServer(settings.metrics_host, settings.metrics_port)
        except OSError as exc:
            print(
                f"fanfare: cannot serve /metrics on {settings.metrics_host}:"
                f"{settings.metrics_port} ({exc.strerror or exc}): another process holds it; "
                "choose another FANFARE_METRICS_PORT",
                file=sys.stderr,
            )
            return EXIT_CANNOT_START
        server.start()
    configure_logging(settings.log_level)
    log_started(logging.getLogger("fanfare.flow_process"), f"{flow}: /metrics served")
    FLOW_INFO.labels(flow=flow).set(1)
    sys.argv = bytewax_argv(flow, options)
    try:
        runpy.run_module("bytewax.run", run_name="__main__", alter_sys=True)
    except KeyboardInterrupt:
        return 0  # stopped by SIGINT before Bytewax ran: nothing to report
    except SystemExit:
        raise
    except BaseException as exc:  # pyo3's PanicException (a cluster's end) is a BaseException
        if stopped_by_signal(exc):
            return 0  # the supervisor's SIGINT: a clean stop, not a failure
        first = first_logged()
        config = configuration_error(exc) or (first and configuration_error(first.error))
        if config is not None:
            print(f"fanfare {flow}: {config}", file=sys.stderr)
            return EXIT_CONFIGURATION
        if first is None and not _is_panic(exc):
            raise  # not a step's error: its traceback is the news
        print(stopped_line(exc, first), file=sys.stderr, flush=True)
        return 1
    finally:
        if server is not None:
            server.close()
    return 0


def stopped_by_signal(exc: BaseException) -> bool:
    """True for how Bytewax ends a run on SIGINT: "signal received", from a KeyboardInterrupt."""
    return isinstance(exc.__cause__, KeyboardInterrupt) or "signal received" in str(exc)


def configuration_error(exc: BaseException) -> str | None:
    """The message of a configuration error behind `exc` (building the flow checks settings)."""
    from operators.adapters.providers.config import ProviderConfigError

    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, (ConfigError, ProviderConfigError)):
            return str(seen)
        seen = seen.__cause__ or seen.__context__
    return None


if __name__ == "__main__":
    sys.exit(main())
