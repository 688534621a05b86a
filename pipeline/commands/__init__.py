"""The `maas` subcommands, one module each; every module has `register(subparsers)`."""

from pipeline.commands import batch, demo, models, serve, stack, submit, worker

MODULES = (stack, worker, serve, batch, submit, demo, models)
