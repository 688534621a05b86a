"""The `maas` command line. `maas --help` and `maas COMMAND --help` describe each command."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys

from aiokafka.errors import KafkaConnectionError, KafkaError
from botocore.exceptions import BotoCoreError, ClientError

from models.artifact import ArtifactError
from models.repository import ModelNotFoundError, without_credentials
from pipeline.commands import MODULES
from pipeline.commands._common import exit_on_sigterm
from pipeline.observability import configure_logging
from pipeline.runtime import DaemonThreadPool, configure_process
from pipeline.settings import ConfigError, Settings


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="maas", description="Models as a service over events.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True)
    for module in MODULES:
        module.register(sub)
    return parser


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
        print(f"maas: error: {without_credentials(str(exc))}", file=sys.stderr)
        code = 2
    except BrokenPipeError:  # `maas models describe m | head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # nothing left to flush at exit
        code = 0
    except KafkaConnectionError as exc:
        where = settings.kafka_bootstrap_servers if settings and settings.kafka_bootstrap_servers else "the broker"
        print(without_credentials(f"maas: error: cannot reach Kafka at {where} (KAFKA_BOOTSTRAP_SERVERS): {exc}"),
              file=sys.stderr)
        code = 2
    except (OSError, KafkaError, BotoCoreError, ClientError) as exc:  # a broker, an endpoint, a port, a file
        message = without_credentials(str(exc))
        kind = type(exc).__name__
        print(f"maas: error: {message if message.startswith(kind) else f'{kind}: {message}'}", file=sys.stderr)
        code = 2
    except KeyboardInterrupt:
        code = 130
    sys.exit(code)


