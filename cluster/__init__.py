"""The mars-serve control plane on Ray.

YAML config schema (pydantic), the Ray Serve application builder, the HTTP
ingress, the global scheduler actor, the session state store, metrics and
dashboards, and the ``mars-serve`` command line (`cluster.cli`).

Dependencies point one way: ``cluster -> workers -> policies``.
"""
