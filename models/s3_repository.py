"""A model repository under an S3 prefix: `s3://bucket/prefix/<name>/<version>/{config.json, ...}`.

Publishing claims the version number with a conditional put (`If-None-Match: *`) of `<version>/claim.json`,
uploads the weights and assets, and writes config.json (holding their sha256 sums) last, so a reader never
sees half a version. Loading streams every file into a local cache folder while hashing it, refuses a file
whose sha256 differs from the one recorded at publish time, and only then makes the folder visible; later
loads of that version (this process or the next) read the cached folder once its files hash to the same sums.

Every key is built from validated parts only: the prefix's segments and model names use the safe alphabet
of `models.artifact.validate_model_name` (no `..`), versions are integers, file names come from a fixed set.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import stat
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

from botocore.exceptions import BotoCoreError, ClientError

from models.artifact import (
    ARTIFACT_FILES,
    CONFIG_FILE,
    MAX_ASSET_BYTES,
    MAX_CONFIG_BYTES,
    MODEL_NAME_RE,
    WEIGHTS_FILE,
    ArtifactError,
    ModelConfig,
    parse_config_bytes,
    validate_model_name,
    verify_files,
    version_number,
    write_artifact,
)
from models.repository import ModelNotFoundError, Repository, RepositoryError, RepositoryUnavailableError

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)
BUCKET_RE = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
CLAIM_FILE = "claim.json"
_NOT_FOUND = {"NoSuchKey", "404", "NotFound"}
_TAKEN = {"PreconditionFailed", "ConditionalRequestConflict"}


def parse_s3_uri(uri: str) -> tuple[str, str]:
    """`s3://bucket/some/prefix` -> ("bucket", "some/prefix"); refuses anything outside the safe alphabet."""
    if not uri.startswith("s3://"):
        raise RepositoryError(f"model repository {uri!r}: expected s3://bucket/prefix")
    bucket, _, prefix = uri[len("s3://"):].partition("/")
    if not BUCKET_RE.fullmatch(bucket) or ".." in bucket:
        raise RepositoryError(f"model repository {uri!r}: {bucket!r} is not a valid bucket name")
    segments = [s for s in prefix.split("/") if s]
    for segment in segments:
        if not MODEL_NAME_RE.fullmatch(segment) or ".." in segment:
            raise RepositoryError(f"model repository {uri!r}: prefix segment {segment!r} is invalid (letters, "
                                  "digits, '_', '-', '.', no '..')")
    return bucket, "/".join(segments)


def default_cache_dir() -> Path:
    """`<tmp>/maas-model-cache-<uid>`, made private to this user. Under a shared /tmp another user could have
    made `<tmp>/maas-model-cache` first, and then swapped a version's files between their sha256 check and
    their load; one made by another user, or that others may write, is refused."""
    path = Path(tempfile.gettempdir()) / f"maas-model-cache-{os.getuid()}"
    try:
        path.mkdir(mode=0o700, exist_ok=True)
        status = path.lstat()
    except OSError as exc:
        raise RepositoryError(f"the model cache folder {path} cannot be made ({exc.strerror or exc}); set "
                              "MAAS_MODEL_CACHE_DIR") from None
    if not stat.S_ISDIR(status.st_mode) or status.st_uid != os.getuid() or status.st_mode & 0o022:
        raise RepositoryError(f"the model cache folder {path} is not a folder of this user's that only it may "
                              "write; remove it, or set MAAS_MODEL_CACHE_DIR")
    return path


class S3ModelRepository(Repository):
    #: How long one listing of the store answers `names()` and `versions()`, in seconds. Each of those asked S3 for a
    #: listing of its own: a request naming a model or version that does not exist (a 404, which rate limits do not
    #: count, since a made-up name must not get a bucket) cost a ListObjectsV2 call, so did each model's metadata, and
    #: the repository index one per model. Now the store is listed at most once per this interval, however many
    #: requests ask (those arriving during a listing wait for it); a version published elsewhere is seen after it.
    listing_ttl_s = 1.0

    def __init__(self, uri: str, client: Any, cache_dir: str | Path | None = None) -> None:
        super().__init__()
        self._listing: tuple[float, dict[str, list[int]]] | None = None  # when it was started, and what it found
        self._listing_lock = threading.Lock()  # the threads of asyncio.to_thread: one listing at a time
        self._publishes = 0  # this repository's publishes so far: a listing begun before one is not kept
        self.bucket, self.prefix = parse_s3_uri(uri)
        self.root = f"s3://{self.bucket}/{self.prefix}".rstrip("/")
        self.client = client
        base = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        self.cache_dir = base / self.bucket / (self.prefix or "_")

    def __repr__(self) -> str:
        return f"S3ModelRepository({self.root!r}, cache_dir={str(self.cache_dir)!r})"

    def _locations(self) -> list[str]:
        return [self.root, str(self.cache_dir.absolute()), str(self.cache_dir.resolve())]

    def _key(self, *parts: str | int) -> str:
        return "/".join(str(p) for p in (self.prefix, *parts) if p != "")

    def _fail(self, exc: Exception, what: str) -> Exception:
        if isinstance(exc, ClientError) and exc.response.get("Error", {}).get("Code") in _NOT_FOUND:
            return ModelNotFoundError(f"{what}: not found", self.root)
        return RepositoryUnavailableError(f"{what} in {self.root}: {exc}")

    def _list(self, prefix: str) -> list[str]:
        keys = []
        try:
            for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix):
                keys.extend(obj["Key"] for obj in page.get("Contents", []))
        except (BotoCoreError, ClientError) as exc:
            raise RepositoryUnavailableError(f"cannot list {self.root}: {exc}") from None
        return keys

    def _index(self, name: str | None = None) -> dict[str, list[int]]:
        """{name: complete versions} from one listing (a version is complete once its config.json exists)."""
        root = self.prefix + "/" if self.prefix else ""
        index: dict[str, list[int]] = {}
        for key in self._list(root + name + "/" if name else root):
            rest = key[len(self.prefix) + 1:] if self.prefix else key
            parts = rest.split("/")
            if len(parts) != 3 or parts[2] != CONFIG_FILE or not MODEL_NAME_RE.fullmatch(parts[0]) or ".." in parts[0]:
                continue
            number = version_number(parts[1])
            if number is not None:
                index.setdefault(parts[0], []).append(number)
        return {n: sorted(v) for n, v in index.items()}

    def _listed(self) -> dict[str, list[int]]:
        """`_index()` of the whole store, listed again once `listing_ttl_s` have passed since the last listing
        began; a caller that finds a listing under way waits for it and takes its answer. A failed one is not kept."""
        with self._listing_lock:
            if self._listing is None or time.monotonic() - self._listing[0] >= self.listing_ttl_s:
                started, publishes = time.monotonic(), self._publishes
                index = self._index()
                if publishes != self._publishes:  # published meanwhile (not under this lock): this listing may
                    return index  # predate it, and kept it would hide the new version for listing_ttl_s
                self._listing = (started, index)
            return self._listing[1]

    def names(self) -> list[str]:
        return sorted(self._listed())

    def versions(self, name: str) -> list[int]:
        validate_model_name(name)
        return list(self._listed().get(name, []))

    def _read_config(self, name: str, version: int) -> ModelConfig:
        try:  # bounded: read one byte past the limit, so that an oversized config is refused, not buffered
            body = self.client.get_object(Bucket=self.bucket, Key=self._key(name, version, CONFIG_FILE))["Body"]
            raw = body.read(MAX_CONFIG_BYTES + 1)
            body.close()
        except (BotoCoreError, ClientError) as exc:
            raise self._fail(exc, f"model {name!r} version {version}") from None
        return parse_config_bytes(raw, f"{name}/{version}/{CONFIG_FILE}")

    def local_folder(self, name: str, version: int) -> Path:
        """The version's files in the local cache folder, downloaded first unless a copy is there whose files
        all match the sha256 sums the store's config.json records: a copy from another store or an earlier
        publish sharing the cache folder, or one tampered with, is replaced."""
        validate_model_name(name)
        version = int(version)
        folder = self.cache_dir / name / str(version)
        config = self.config(name, version)
        if not config.files:
            raise ArtifactError(f"{name}/{version}/{CONFIG_FILE}.files: no sha256 sums recorded; "
                                "republish with `maas models publish`")
        if folder.exists():  # its config.json is not read (the store's is), and may be gone: the files decide
            try:
                verify_files(folder, config)
                return folder
            except (ArtifactError, OSError) as exc:
                log.warning("cached copy of %s/%s/%d does not match the store (%s); downloading it again",
                            self.root, name, version, exc)
                stale = folder.parent / f".{version}.stale.{uuid.uuid4().hex}"
                with contextlib.suppress(OSError):  # another process may have moved it first
                    folder.rename(stale)
                shutil.rmtree(stale, ignore_errors=True)
        staging = folder.parent / f".{version}.{uuid.uuid4().hex}"
        try:
            staging.mkdir(parents=True)
            for file_name, want in config.files.items():
                self._download(name, version, file_name, staging / file_name, want)
            (staging / CONFIG_FILE).write_text(json.dumps(config.to_json(), indent=2) + "\n")
            try:
                staging.rename(folder)
            except OSError:  # another thread or process finished the same download first
                if not (folder / CONFIG_FILE).exists():
                    raise
        except RepositoryError:
            raise
        except OSError as exc:  # the local cache folder (full, read-only): str(exc) would quote its path
            log.error("cannot write the local copy of %s/%s/%d under %s: %s", self.root, name, version,
                      self.cache_dir, exc)
            raise RepositoryError(f"cannot write the local copy of {name}/{version} "
                                  f"({exc.strerror or type(exc).__name__}); the server's log says where") from None
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return folder

    def _download(self, name: str, version: int, file_name: str, path: Path, sha256: str) -> None:
        where = f"{name}/{version}/{file_name}"  # as models.artifact.artifact_path names it
        digest = hashlib.sha256()
        # Weights are held to the model cache's budget before a load (weights_nbytes); an asset is read whole into
        # memory at every load, so one over MAX_ASSET_BYTES is refused from the GET's headers, before its body.
        limit = None if file_name == WEIGHTS_FILE else MAX_ASSET_BYTES
        try:
            obj = self.client.get_object(Bucket=self.bucket, Key=self._key(name, version, file_name))
            body = obj["Body"]
            try:
                if limit is not None and int(obj.get("ContentLength", 0)) > limit:
                    raise ArtifactError(f"{where} is over the {limit:,} bytes an asset may have")
                written = 0
                with path.open("wb") as f:
                    for chunk in body.iter_chunks(1 << 20):
                        written += len(chunk)
                        if limit is not None and written > limit:
                            raise ArtifactError(f"{where} is over the {limit:,} bytes an asset may have")
                        digest.update(chunk)
                        f.write(chunk)
            finally:
                body.close()
        except (BotoCoreError, ClientError) as exc:
            raise self._fail(exc, where) from None
        if digest.hexdigest() != sha256:
            raise ArtifactError(f"{where}: sha256 {digest.hexdigest()} differs from {sha256} recorded in "
                                f"{CONFIG_FILE}; refusing to load it")

    def _claim(self, name: str, start: int) -> int:
        body = json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "time": time.time()}).encode()
        version = start
        for _ in range(100):
            try:
                self.client.put_object(Bucket=self.bucket, Key=self._key(name, version, CLAIM_FILE), Body=body,
                                       IfNoneMatch="*")
                return version
            except ClientError as exc:
                if exc.response.get("Error", {}).get("Code") not in _TAKEN:
                    raise RepositoryError(f"cannot publish to {self.root}: {exc}") from None
                version += 1
            except BotoCoreError as exc:
                raise RepositoryError(f"cannot publish to {self.root}: {exc}") from None
        raise RepositoryError(f"cannot claim a version of {name!r} in {self.root} after 100 tries")

    def weights_nbytes(self, name: str, version: int) -> int | None:
        try:
            head = self.client.head_object(Bucket=self.bucket, Key=self._key(validate_model_name(name), int(version),
                                                                              WEIGHTS_FILE))
        except (BotoCoreError, ClientError):
            return None
        return int(head["ContentLength"])

    def _write(self, name: str, config: ModelConfig, weights: dict[str, torch.Tensor],
               assets: dict[str, bytes]) -> int:
        version = self._claim(name, (self._index(name).get(name) or [0])[-1] + 1)  # the store's, not the listing's
        with tempfile.TemporaryDirectory(prefix="maas-publish-") as tmp:
            written = write_artifact(Path(tmp), config, weights, assets)
            try:
                for file_name in written.files:
                    if file_name not in ARTIFACT_FILES:
                        raise ArtifactError(f"unexpected artifact file {file_name!r}")
                    self.client.upload_file(str(Path(tmp) / file_name), self.bucket,
                                            self._key(name, version, file_name))
                self.client.put_object(Bucket=self.bucket, Key=self._key(name, version, CONFIG_FILE),
                                       Body=(Path(tmp) / CONFIG_FILE).read_bytes(),
                                       ContentType="application/json")
            except (BotoCoreError, ClientError) as exc:
                raise RepositoryError(f"cannot publish {name!r} version {version} to {self.root}: {exc}") from None
        self._publishes += 1  # before the listing is dropped: a listing under way now is not kept (see `_listed`)
        self._listing = None  # this repository's callers see what it published at once
        return version
