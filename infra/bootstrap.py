"""Create the topics, buckets and queues the platform uses, when they are missing (idempotent)."""

from __future__ import annotations

import contextlib
from typing import Any

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError


async def ensure_topics(kafka: dict[str, Any], names: list[str], partitions: int = 4,
                        replication_factor: int = 1, configs: dict[str, str] | None = None) -> list[str]:
    """Create the topics of `names` that do not exist yet, with the topic `configs` given; returns the ones created.
    A topic that exists is left as it is."""
    admin = AIOKafkaAdminClient(**kafka)
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        missing = [n for n in names if n not in existing]
        if missing:
            with contextlib.suppress(TopicAlreadyExistsError):  # another process created them first
                await admin.create_topics([NewTopic(n, partitions, replication_factor, topic_configs=configs or {})
                                           for n in missing])
        return missing
    finally:
        await admin.close()


def ensure_buckets(s3: Any, names: list[str]) -> list[str]:
    """Create the buckets that are missing, in the client's region (S3 refuses a bucket outside us-east-1
    that does not name its region)."""
    existing = {b["Name"] for b in s3.list_buckets().get("Buckets", [])}
    region = s3.meta.region_name
    where = {} if region in (None, "us-east-1") else {"CreateBucketConfiguration": {"LocationConstraint": region}}
    created = []
    for name in names:
        if name not in existing:
            try:
                s3.create_bucket(Bucket=name, **where)
            except s3.exceptions.BucketAlreadyOwnedByYou:  # another process created it first
                continue
            created.append(name)
    return created


def ensure_queue(sqs: Any, name: str, dlq_name: str | None = None, max_receive_count: int = 5) -> str:
    """Create a queue (with a redrive policy to `dlq_name` when given); returns its URL."""
    attributes: dict[str, str] = {}
    if dlq_name:
        dlq_url = sqs.create_queue(QueueName=dlq_name)["QueueUrl"]
        dlq_arn = sqs.get_queue_attributes(QueueUrl=dlq_url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
        attributes["RedrivePolicy"] = (
            f'{{"deadLetterTargetArn":"{dlq_arn}","maxReceiveCount":"{max_receive_count}"}}'
        )
    return sqs.create_queue(QueueName=name, Attributes=attributes)["QueueUrl"]
