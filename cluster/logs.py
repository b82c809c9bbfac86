"""Logging for the Serve deployments: where their lines go, and the request
id that ties one request's lines together across deployments.

Every line about a turn names ``session=<id> request=<id>``. The request id is
Ray Serve's: the HTTP proxy assigns it (or takes the client's
``X-Request-ID``), returns it in the response's ``X-Request-ID`` header, and
Serve passes it along with every deployment-handle call made while serving the
request, so the ingress, the global scheduler and the engine log the same id
without our passing it.
"""

from __future__ import annotations

import logging

from ray.serve.context import _get_serve_request_context

NO_REQUEST = "-"
"""The request id outside a Serve request (start-up, background tasks)."""


def serve_logger(module: str) -> logging.Logger:
    """The logger of `module`, as a child of Ray Serve's ``ray.serve`` logger.

    In a replica Ray Serve configures only ``ray.serve`` (level INFO, the
    replica's log file under ``logs/serve/``, stderr); a plain module logger
    propagates to the unconfigured root logger, which drops INFO lines. A
    child of ``ray.serve`` lands in the replica's log, which the Ray
    dashboard shows.
    """
    return logging.getLogger(f"ray.serve.{module}")


def adopt_into_serve_log(package: str) -> None:
    """Send the log lines of `package` (a library the replica runs, logging
    to its own module loggers, e.g. ``workers``) to the replica's Serve log.

    Its loggers propagate to the root logger, which a replica does not
    configure: without this, the engine thread's failure traceback was lost
    and only the symptom (a failed health check) reached the logs. INFO and
    above, through Ray Serve's own handlers (its file under ``logs/serve/``).
    """
    serve = logging.getLogger("ray.serve")
    adopted = logging.getLogger(package)
    for handler in serve.handlers:
        if handler not in adopted.handlers:
            adopted.addHandler(handler)
    adopted.setLevel(logging.INFO)
    adopted.propagate = False


def request_id() -> str:
    """The Serve request id of the request being served, or `NO_REQUEST`.

    Read through `ray.serve.context._get_serve_request_context` (Ray 2.60 has
    no public accessor; Serve's own log filter reads it the same way)."""
    return _get_serve_request_context().request_id or NO_REQUEST
