"""`maas models`: list, describe and publish models in the repository."""

from __future__ import annotations

import argparse
import json

from models.examples import ensure_examples
from pipeline.commands._common import open_repository
from pipeline.settings import Settings


async def cmd_models(args: argparse.Namespace, settings: Settings) -> int:
    repository = open_repository(settings)
    if args.models_command == "examples":
        published = ensure_examples(repository)
        for name, version in published:
            print(f"published {name} v{version}")
        if not published:
            print(f"examples already present in {repository.root}")
    elif args.models_command == "list":
        for name in repository.names():
            versions = repository.versions(name)
            print(f"{name}\tversions {versions}\tlatest {versions[-1]}")
    elif args.models_command == "describe":
        version = repository.resolve(args.name, args.version)
        config = repository.config(args.name, version)
        print(json.dumps({"name": args.name, "version": version, "versions": repository.versions(args.name),
                          **config.to_json()}, indent=2))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    models = sub.add_parser("models", help="the model repository (MAAS_MODEL_REPOSITORY)")
    msub = models.add_subparsers(dest="models_command", required=True)
    msub.add_parser("list", help="models and their versions")
    describe = msub.add_parser("describe", help="one model's config")
    describe.add_argument("name")
    describe.add_argument("--version", default=None)
    msub.add_parser("examples", help="publish the example models if missing")
    models.set_defaults(run=cmd_models)
