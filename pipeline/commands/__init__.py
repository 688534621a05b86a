"""The `maas` subcommands, one module each; every module has `register(subparsers)`."""

from pipeline.commands import demo, models, stack, submit, worker

MODULES = (stack, worker, submit, demo, models)
