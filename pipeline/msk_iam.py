"""Amazon MSK IAM authentication for aiokafka: SASL/OAUTHBEARER with a token signed by the AWS credential chain.

MSK's IAM listener (port 9098) takes no username or password: each connection presents a short-lived SigV4-
signed token made from the process's AWS credentials (a Lambda function's or a pod's role), which AWS's own
signer library builds (`aws-msk-iam-sasl-signer-python`). Set KAFKA_SECURITY_PROTOCOL=SASL_SSL and
KAFKA_SASL_MECHANISM=AWS_MSK_IAM (the name Java clients use for the same thing).
"""

from __future__ import annotations

import asyncio

from aiokafka.abc import AbstractTokenProvider

MECHANISM = "AWS_MSK_IAM"


class MskIamTokenProvider(AbstractTokenProvider):
    """A fresh token per SASL handshake; signing may read credentials over the network, so off the loop."""

    def __init__(self, region: str) -> None:
        self.region = region

    async def token(self) -> str:
        from aws_msk_iam_sasl_signer import MSKAuthTokenProvider

        token, _expiry_ms = await asyncio.to_thread(MSKAuthTokenProvider.generate_auth_token, self.region)
        return token
