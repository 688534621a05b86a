"""Helpers for tests of an S3 model repository whose store goes away: S3 down, and what callers may read of it."""

from __future__ import annotations

from typing import Any

import boto3
from botocore.config import Config

from infra.stack import free_port
from models.s3_repository import S3ModelRepository


def unreachable_s3() -> Any:
    """An S3 client whose endpoint refuses connections (a closed port on loopback): S3 down, as a repository that
    uses it sees it. One attempt per call: botocore's retries would only make a test wait."""
    return boto3.client("s3", endpoint_url=f"http://127.0.0.1:{free_port()}", region_name="us-east-1",
                        aws_access_key_id="maas-local", aws_secret_access_key="maas-local",
                        config=Config(retries={"max_attempts": 1}, connect_timeout=2))


def assert_names_no_location(message: str, repository: S3ModelRepository, client: Any) -> None:
    """`message`, which callers get, quotes neither the S3 endpoint (its URL, host:port) nor the repository's
    bucket, prefix or a key under it."""
    host = client.meta.endpoint_url.removeprefix("http://")
    for where in ("s3://", "http://", host, host.partition(":")[2], repository.bucket, repository.prefix):
        assert where not in message, (where, message)
