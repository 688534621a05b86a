"""S3 trigger: an uploaded `<inbox>/<job>.jsonl` runs as a batch job (see `pipeline.batch_jobs`).

Keys arrive URL-encoded in the event and are decoded with unquote_plus. A failure raises, so the (async)
S3 invocation is retried by Lambda and, after its retries, goes to the function's on-failure destination;
a retried or duplicated event for an object that already has its summary is skipped.
"""

from __future__ import annotations

from typing import Any

from functions.runtime import Runtime, invoke
from pipeline.batch_jobs import object_refs


async def handle(runtime: Runtime, event: dict[str, Any]) -> dict[str, Any]:
    runner = runtime.batch_runner()
    jobs = []
    for ref in dict.fromkeys(object_refs(event)):
        summary = await runner.run(ref.bucket, ref.key)
        if summary is None:
            jobs.append({"key": ref.key, "status": "ignored"})
        else:
            jobs.append({"key": ref.key, "job": summary["job"], "lines": summary["lines"], "ok": summary["ok"],
                         "errors": summary["errors"], "results": summary["results"]["key"],
                         "status": "duplicate" if summary.get("duplicate") else summary["status"]})
    return {"jobs": jobs}


def handler(event: dict[str, Any], context: Any = None) -> dict[str, Any]:
    return invoke("s3", lambda runtime: handle(runtime, event), records=len(event.get("Records") or []))
