"""Shared fixtures: one real local stack (Tansu broker + moto server) for the session, isolated names per test.

TRITON_INTERPRET must be set before any @triton.jit function is defined, so it is set here, first, on
machines without a GPU (on a GPU the kernel tests run the compiled kernels).
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import logging
import shutil
import uuid
from dataclasses import replace
from pathlib import Path

import pytest

from infra.stack import LocalStack
from models.examples import ensure_examples
from models.repository import ModelRepository
from pipeline.services import bootstrap
from pipeline.settings import Settings, Topics


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory):
    with LocalStack(tmp_path_factory.mktemp("stack"), keep_logs=True) as running:
        yield running


@pytest.fixture(scope="session")
def examples_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("model_repository")
    ensure_examples(ModelRepository(root))
    return root


@pytest.fixture
def repository(examples_root: Path, tmp_path: Path) -> ModelRepository:
    """A private copy of the example repository, so a test may add models without affecting others."""
    root = tmp_path / "model_repository"
    shutil.copytree(examples_root, root)
    return ModelRepository(root)


@pytest.fixture
def settings(stack: LocalStack, repository: ModelRepository) -> Settings:
    """Settings pointing at the session stack, with topics and a consumer group of this test's own."""
    suffix = uuid.uuid4().hex[:10]
    topics = Topics(*(f"t{suffix}.{name}" for name in ("requests", "results", "metrics", "dlq")))
    return replace(
        Settings(),
        kafka_bootstrap_servers=stack.bootstrap_servers,
        aws_endpoint_url=stack.endpoint_url,
        model_repository=str(repository.root),
        batch_bucket=f"b{suffix}",
        topics=topics,
        topic_partitions=2,
        consumer_group=f"g{suffix}",
        worker_id=f"w{suffix}",
        commit_interval_ms=200,
    )


@pytest.fixture
async def live(settings: Settings) -> Settings:
    """`settings` with its topics and bucket created."""
    await bootstrap(settings)
    return settings


@pytest.fixture
def restore_logging():
    """Put back what `configure_logging` changes, for the tests after this one: the root logger's handlers and
    level, and aiokafka's level."""
    root, library = logging.getLogger(), logging.getLogger("aiokafka")
    saved = root.handlers[:], root.level, library.level
    yield
    root.handlers[:] = saved[0]
    root.setLevel(saved[1])
    library.setLevel(saved[2])
