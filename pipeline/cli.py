"""The `maas` command line. `maas --help` and `maas COMMAND --help` describe each command."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys

from aiokafka.errors import KafkaConnectionError, KafkaError
from botocore.exceptions import BotoCoreError, ClientError, EndpointConnectionError

from models.artifact import ArtifactError
from models.repository import ModelNotFoundError, without_credentials
from pipeline.commands import MODULES
from pipeline.commands._common import exit_on_sigterm
from pipeline.observability import configure_logging
from pipeline.runtime import DaemonThreadPool, configure_process
from pipeline.services import STATE_FILE, read_state
from pipeline.settings import ConfigError, Settings


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="maas", description="Models as a service over events.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True)
    for module in MODULES:
        module.register(sub)
    _verbose_anywhere(parser)
    return parser


def _stack_hint(settings: Settings | None) -> str:
    """What to do when an address a command took from `maas up`'s .maas/stack.json does not answer (that `maas up`
    lives, its stack does not): the message named KAFKA_BOOTSTRAP_SERVERS, which the user never set."""
    state = read_state()
    if state is None or settings is None or not (settings.embedded_kafka or settings.embedded_aws):
        return ""
    return (f"; the address is that of the stack `maas up` (pid {state['pid']}) recorded in {STATE_FILE}: if it has "
            "stopped answering, stop that `maas up` and start it again")


def _verbose_anywhere(parser: argparse.ArgumentParser) -> None:
    """`-v` after the command too (`maas worker -v`), as `--help` is: only `maas -v worker` was accepted, and
    `maas worker -v` ended in "unrecognized arguments". SUPPRESS leaves the top level's value when not given."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for command in action.choices.values():
                command.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                                     help="log at INFO level")
                _verbose_anywhere(command)


async def _run(args: argparse.Namespace, settings: Settings) -> int:
    """The command, its blocking calls (`asyncio.to_thread`) on threads that do not hold the process's exit
    (`DaemonThreadPool`): an S3 or SQS call that hangs outlived the stop that abandoned it by minutes."""
    asyncio.get_running_loop().set_default_executor(DaemonThreadPool())
    return await args.run(args, settings)


def main(argv: list[str] | None = None) -> None:
    exit_on_sigterm()  # first: the imports and argument parsing before it start nothing to clean up
    sys.stdout.reconfigure(line_buffering=True)  # progress lines reach logs and pipes as they happen
    args = build_parser().parse_args(argv)
    settings: Settings | None = None
    try:
        settings = Settings.from_env()
        configure_logging(args.verbose, settings.log_format)
        configure_process(settings)
        code = asyncio.run(_run(args, settings))
    except (ConfigError, ArtifactError, ModelNotFoundError) as exc:
        hint = _stack_hint(settings) if str(exc).startswith("cannot reach") else ""
        print(f"maas: error: {without_credentials(str(exc))}{hint}", file=sys.stderr)
        code = 2
    except BrokenPipeError:  # `maas models describe m | head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # nothing left to flush at exit
        code = 0
    except KafkaConnectionError as exc:
        hint = _stack_hint(settings)
        state = read_state() if hint else None
        where = (settings.kafka_bootstrap_servers if settings and settings.kafka_bootstrap_servers
                 else state["kafka_bootstrap_servers"] if state else "the broker")
        print(without_credentials(f"maas: error: cannot reach Kafka at {where} "
                                  f"({STATE_FILE if state else 'KAFKA_BOOTSTRAP_SERVERS'}): {exc}{hint}"),
              file=sys.stderr)
        code = 2
    except (OSError, KafkaError, BotoCoreError, ClientError) as exc:  # a broker, an endpoint, a port, a file
        message = without_credentials(str(exc))
        kind = type(exc).__name__
        hint = _stack_hint(settings) if isinstance(exc, EndpointConnectionError) else ""
        print(f"maas: error: {message if message.startswith(kind) else f'{kind}: {message}'}{hint}", file=sys.stderr)
        code = 2
    except KeyboardInterrupt:
        code = 130
    sys.exit(code)


