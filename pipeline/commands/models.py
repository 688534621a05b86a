"""`maas models`: list, describe and publish models in the repository (a folder or s3://bucket/prefix)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from models.examples import EXAMPLES, ensure_examples
from models.repository import Repository, RepositoryError
from pipeline.commands._common import positive_int
from pipeline.services import open_repository
from pipeline.settings import ConfigError, Settings


async def cmd_models(args: argparse.Namespace, settings: Settings) -> int:
    if args.models_command == "precompile":  # no repository: it compiles what a tuning table recorded
        return _precompile(args)
    repository = open_repository(settings)
    try:
        return _run(args, repository)
    except RepositoryError as exc:
        raise ConfigError(str(exc)) from None


def _run(args: argparse.Namespace, repository: Repository) -> int:
    if args.models_command == "examples":
        which = "all" if args.all else (args.only or "default")
        published = ensure_examples(repository, which, log=print)
        if not published:
            print(f"examples already present in {repository.root}")
    elif args.models_command == "list":
        names = repository.names()
        if not names:  # said on stderr: stdout stays a list, empty, for scripts
            print(f"no models in {repository.root} (MAAS_MODEL_REPOSITORY): `maas models publish` or `maas models "
                  "examples` adds some", file=sys.stderr)
        for name in names:
            versions = repository.versions(name)
            print(f"{name}\tversions {versions}\tlatest {versions[-1]}")
    elif args.models_command == "describe":
        version = repository.resolve(args.name, args.version)
        config = repository.config(args.name, version)
        print(json.dumps({"name": args.name, "version": version, "versions": repository.versions(args.name),
                          **config.to_json()}, indent=2))
    elif args.models_command == "tune":
        _tune(args.names, Path(args.output), repository)
    elif args.models_command == "publish":
        from models.publish import publish_model, read_source  # torch: not imported by the serving commands

        source = read_source(args.src, args.config, args.tokenizer)
        if source.config is None:
            raise ConfigError(f"{args.src} carries no config.json: pass --config CONFIG.json (architecture, params, "
                              "inputs, outputs)")
        result = publish_model(repository, args.name, source.config, source.weights, source.assets, args.quantize)
        print(f"published {result.name} v{result.version} ({result.config.architecture}"
              f"{', int8' if result.config.quantization else ''}) to {repository.root}")
        for output, stats in result.quantization_report.items():
            numbers = ", ".join(f"{k} {v:.4g}" for k, v in stats.items())
            print(f"int8 vs float on the warm-up inputs, output {output!r}: {numbers}")
    return 0


def _tune(names: list[str], output: Path, repository: Repository) -> None:
    import torch  # not imported by the serving commands

    from kernels._autotune import write_tuning_table
    from kernels._tuning_table import summary
    from kernels.precompile import record_binaries
    from models.cache import ModelCache

    if not torch.cuda.is_available():
        raise ConfigError("no CUDA GPU here: `models tune` times kernels on the GPU model the workers will run on")
    record_binaries()  # the table lists the binaries its workers need, for `models precompile`
    cache = ModelCache(repository)
    for name in names:
        loaded = cache.get(name, cache.resolve(name))  # the warm-up tunes its kernels
        print(f"{name} v{loaded.version}: warmed up in {loaded.warmup_seconds:.1f} s")
    table = write_tuning_table(output)
    print(f"wrote {output}: {summary(table)} for {table['device']}")


def _precompile(args: argparse.Namespace) -> int:
    import triton  # not imported by the serving commands

    from kernels import dispatch
    from kernels._autotune import usable_cpus
    from kernels._tuning_table import TABLE_DIR, device_file
    from kernels.precompile import precompile

    if dispatch.INTERPRETER:
        raise ConfigError("TRITON_INTERPRET is set: `models precompile` needs Triton's real compiler; unset it")
    path = Path(args.table) if args.table else device_file(args.gpu)
    if not path.is_file():
        shipped = ", ".join(sorted(p.stem for p in TABLE_DIR.glob("*.json"))) or "none"
        raise ConfigError(f"no tuning table at {path} (tables shipped for: {shipped}; `maas models tune` writes one "
                          "on a GPU)")
    try:
        table = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"tuning table {path} unreadable: {exc}") from None
    binaries = table.get("binaries") if isinstance(table, dict) else None
    if not isinstance(binaries, list) or not binaries:
        raise ConfigError(f"tuning table {path} lists no kernel binaries under \"binaries\": export it again with "
                          "`maas models tune` on its GPU model (tables exported before that command recorded them "
                          "hold only picks)")
    if args.cache_dir:
        Path(args.cache_dir).mkdir(parents=True, exist_ok=True)
        os.environ["TRITON_CACHE_DIR"] = str(Path(args.cache_dir).resolve())
    threads = args.threads or usable_cpus()
    targets = sorted({f"sm_{b['target'].get('arch')}" for b in binaries
                      if isinstance(b, dict) and isinstance(b.get("target"), dict)})
    print(f"precompiling {len(binaries)} kernel binaries for {table.get('device', path.stem)} "
          f"({', '.join(targets)}) with Triton {triton.__version__} into {triton.knobs.cache.dir} on {threads} "
          "threads")
    if table.get("triton") != triton.__version__:
        print(f"note: the table was recorded with Triton {table.get('triton')}: workers find these binaries only if "
              f"they run Triton {triton.__version__} and these kernel sources")
    done = precompile(binaries, threads)
    print(f"compiled {done.compiled} binaries in {done.seconds:.1f} s; "
          f"{done.binaries - done.compiled - len(done.failed)} were in the cache already; {len(done.failed)} failed")
    if done.host_modules_skipped:
        some = f"launchers: {done.host_modules} host modules built or in the cache, others" if done.host_modules \
            else "launchers"
        print(f"{some} not built ({done.host_modules_skipped}): workers build them on their first launches, "
              "about a second in all; build on a machine with the NVIDIA driver's libcuda.so.1 to include them")
    else:
        print(f"launchers: {done.host_modules} host modules built or in the cache")
    for failure in done.failed:
        print(f"maas: failed: {failure}", file=sys.stderr)
    return 1 if done.failed else 0


def register(sub: argparse._SubParsersAction) -> None:
    models = sub.add_parser("models", help="the model repository (MAAS_MODEL_REPOSITORY: a folder or s3://bucket/prefix)")
    msub = models.add_subparsers(dest="models_command", required=True)
    msub.add_parser("list", help="models and their versions")
    describe = msub.add_parser("describe", help="one model's config")
    describe.add_argument("name")
    describe.add_argument("--version", default=None)
    examples = msub.add_parser("examples", help="publish the example models if missing (default: mnist_mlp only)")
    group = examples.add_mutually_exclusive_group()
    group.add_argument("--all", action="store_true", help="every example: one per architecture (about a minute)")
    group.add_argument("--only", nargs="+", choices=sorted(EXAMPLES), metavar="NAME",
                       help=f"these examples: {', '.join(sorted(EXAMPLES))}")
    publish = msub.add_parser("publish", help="publish weights as the next version of a model",
                              description="Publish SRC (a .safetensors file, a torch state dict .pt/.pth/.bin read "
                                          "with weights_only=True, or a folder holding one plus tokenizer.json and "
                                          "config.json) as <repository>/<name>/<next version>/.")
    publish.add_argument("src", help="weights file or folder")
    publish.add_argument("--name", required=True, help="model name (letters, digits, '_', '-', '.')")
    publish.add_argument("--config", default=None, help="config.json: architecture, params, inputs, outputs (a "
                                                        "Hugging Face BERT config.json is converted)")
    publish.add_argument("--tokenizer", default=None, help="tokenizer.json for text models")
    publish.add_argument("--quantize", choices=["int8"], default=None,
                         help="weight-only int8 dense layers; prints the output difference to the float model")
    tune = msub.add_parser("tune", help="warm models up on this GPU and write what they tuned as a tuning table",
                           description="Load and warm up each model (latest version) on this machine's GPU, which "
                                       "autotunes its kernels, and write the picks as a tuning table: point "
                                       "MAAS_TUNING_TABLE at it, or ship it as kernels/tuned/<device>.json, and "
                                       "workers on the same GPU model with an empty TRITON_CACHE_DIR compile only "
                                       "the picks and time nothing. The table also lists those binaries, which "
                                       "`maas models precompile` compiles on a machine without a GPU. Run it "
                                       "with MAAS_TUNING_TABLE=none and an empty TRITON_CACHE_DIR to time "
                                       "everything afresh.")
    tune.add_argument("names", nargs="+", help="model names in the repository")
    tune.add_argument("--output", required=True, help="where to write the table (JSON)")
    precompile = msub.add_parser(
        "precompile", help="compile the kernel binaries a tuning table lists, no GPU needed (e.g. in a docker build)",
        description="Compile every kernel binary a tuning table lists (the binaries the warm-ups of `maas models "
                    "tune` needed, for its GPU model) into TRITON_CACHE_DIR, on this machine's CPUs: a worker on "
                    "that GPU model finding them there compiles nothing before its first batch. The workers must "
                    "run the same Triton and the same kernels/ sources as this command. Exits 1 if a binary fails.")
    which = precompile.add_mutually_exclusive_group(required=True)
    which.add_argument("--gpu", help="the GPU model, as CUDA names it (\"NVIDIA H100 80GB HBM3\"): its table "
                                     "shipped in kernels/tuned/")
    which.add_argument("--table", help="a tuning table file (JSON)")
    precompile.add_argument("--cache-dir", default=None,
                            help="where to put the binaries (default: TRITON_CACHE_DIR, else ~/.triton/cache)")
    precompile.add_argument("--threads", type=positive_int, default=None,
                            help="compiles at once (default: every CPU this process may use)")
    models.set_defaults(run=cmd_models)
