"""The public side uploaded to an S3-compatible bucket (AWS S3, R2, B2, MinIO, Spaces…).

A bucket behind a static host or CDN keeps the status page and banner up while the
company's own infrastructure is down. boto3 is imported on first use (adapters load with
the config) and its blocking calls run in threads, off the event loop. Every boto3 and
botocore failure is translated here into the channel contract's errors, with messages
built from S3's error code only: S3's own messages may echo the request's signing details.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Callable
from itertools import groupby
from typing import Any, TypeVar

from pydantic import SecretStr

from broadcaster.errors import (
    BroadcasterError,
    ChannelBrokenError,
    DeliveryError,
    PermanentError,
    TransientError,
)
from broadcaster.site.media import CACHE_CONTROL, content_type
from channels.base import retry_after_seconds

__all__ = ["SiteBucket", "bucket_prefix", "parse_bucket_url"]

T = TypeVar("T")

CONNECT_TIMEOUT_SECONDS = 5.0
READ_TIMEOUT_SECONDS = 15.0

# S3 error codes no retry can fix: the credentials, what they may do, or the region.
_BROKEN = {
    "InvalidAccessKeyId": "credentials refused: unknown access key id",
    "SignatureDoesNotMatch": "credentials refused: wrong secret access key",
    "AccessDenied": "access denied — the key may not write to this bucket",
    "403": "access denied (HTTP 403) — check the keys and what they may do",
    "AllAccessDisabled": "all access to this bucket is disabled",
    "AccountProblem": "the provider reports a problem with the account",
    "InvalidToken": "credentials refused: invalid session token",
    "ExpiredToken": "credentials refused: the session token has expired",
    "AuthorizationHeaderMalformed": "wrong region — set `region` to the bucket's",
    "PermanentRedirect": "wrong region or endpoint — set `region` to the bucket's",
    "301": "wrong region or endpoint — set `region` to the bucket's",
}
# Throttling and provider trouble (S3 says "SlowDown" with a 503).
_BUSY = {"SlowDown", "ServiceUnavailable", "InternalError", "RequestTimeout", "Throttling"}


def bucket_prefix(prefix: str) -> str:
    """A key prefix as S3 wants it: no leading slash, one trailing slash ('' for none)."""
    stripped = prefix.strip("/")
    return f"{stripped}/" if stripped else ""


def parse_bucket_url(url: str) -> tuple[str, str]:
    """`s3://bucket/some/prefix` -> ("bucket", "some/prefix/")."""
    bucket, _, prefix = url.removeprefix("s3://").partition("/")
    if not url.startswith("s3://") or not bucket:
        raise BroadcasterError(f"no bucket in {url!r} — write s3://bucket or s3://bucket/prefix")
    return bucket, bucket_prefix(prefix)


def _upload_stage(path: str) -> int:
    """Script and feeds first, then the data, then the pages, the root page last: a
    reader never gets a new page whose script or data are not there yet."""
    if path == "index.html":
        return 3
    if path.endswith(".html"):
        return 2
    if path.endswith(".json"):
        return 1
    return 0


class SiteBucket:
    """A bucket (and key prefix) the public side is uploaded to, skipping unchanged files."""

    def __init__(
        self,
        *,
        what: str,
        bucket: str,
        prefix: str = "",
        endpoint_url: str | None = None,
        region: str | None = None,
        path_style: bool = False,
        credentials: Callable[[], tuple[SecretStr, SecretStr] | None] = lambda: None,
    ) -> None:
        self.what = what
        self.bucket = bucket
        self.prefix = bucket_prefix(prefix)
        self.endpoint_url = endpoint_url
        self.region = region
        self.path_style = path_style
        self._credentials = credentials
        self._client: Any = None
        self._client_lock = asyncio.Lock()
        # key -> MD5 of what this process last uploaded there (S3's ETag of a simple put)
        self._uploaded: dict[str, str] = {}

    @property
    def url(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}"

    def _make_client(self) -> Any:
        try:
            import boto3
            from botocore.config import Config
        except ImportError:
            raise ChannelBrokenError(
                f"{self.what}: a bucket needs boto3 — pip install 'incident-broadcaster[s3]'"
            ) from None

        keys: dict[str, str] = {}
        credentials = self._credentials()  # None: boto3's own chain (AWS_* env, profile, role)
        if credentials is not None:
            key_id, secret = credentials
            keys = {
                "aws_access_key_id": key_id.get_secret_value(),
                "aws_secret_access_key": secret.get_secret_value(),
            }
        config = Config(
            connect_timeout=CONNECT_TIMEOUT_SECONDS,
            read_timeout=READ_TIMEOUT_SECONDS,
            # The dispatcher retries with backoff and honours the channel's deadline.
            retries={"total_max_attempts": 1},
            s3={"addressing_style": "path" if self.path_style else "auto"},
            # Many S3-compatible stores reject the CRC checksums boto3 sends by default.
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        )
        # A session per client: boto3's default session is not safe to share across threads.
        return boto3.session.Session().client(
            "s3", endpoint_url=self.endpoint_url, region_name=self.region, config=config, **keys
        )

    async def _call(self, operation: Callable[[Any], T]) -> T:
        """Run one blocking S3 call in a thread; failures come out classified."""
        try:
            async with self._client_lock:
                if self._client is None:
                    self._client = await asyncio.to_thread(self._make_client)
            return await asyncio.to_thread(operation, self._client)
        except Exception as exc:
            error = exc if isinstance(exc, DeliveryError) else self.classify(exc)
            if isinstance(error, ChannelBrokenError):
                # Read the keys again next time (they may be fixed by then); calls still in
                # flight keep the old client until they finish.
                self._client = None
            raise error from None  # botocore's text may carry signing details

    async def upload(self, files: dict[str, bytes]) -> list[str]:
        """Upload the files that changed since the last upload; return their keys."""
        pending = sorted(files, key=lambda path: (_upload_stage(path), path))
        uploaded: list[str] = []
        for _, stage in groupby(pending, key=_upload_stage):
            puts = []
            for path in stage:
                key = self.prefix + path
                digest = hashlib.md5(files[path], usedforsecurity=False).hexdigest()
                if self._uploaded.get(key) != digest:
                    puts.append((path, key, digest))
            results = await asyncio.gather(
                *(self._put(key, files[path], path) for path, key, _ in puts),
                return_exceptions=True,
            )
            for (_, key, digest), result in zip(puts, results, strict=True):
                if result is None:
                    self._uploaded[key] = digest
                    uploaded.append(key)
            errors = [r for r in results if isinstance(r, BaseException)]
            if errors:  # later stages wait: no page ahead of its data
                broken = [e for e in errors if isinstance(e, ChannelBrokenError)]
                raise (broken or errors)[0]
        return uploaded

    async def _put(self, key: str, body: bytes, path: str) -> None:
        await self._call(
            lambda client: client.put_object(
                Bucket=self.bucket,
                Key=key,
                Body=body,
                ContentType=content_type(path),
                CacheControl=CACHE_CONTROL,
            )
        )

    async def problem(self) -> str | None:
        """Why the bucket cannot be reached or used, in one line; None when it can."""
        try:
            await self._call(lambda client: client.head_bucket(Bucket=self.bucket))
        except DeliveryError as exc:
            return str(exc)
        return None

    async def close(self) -> None:
        if self._client is not None:
            client, self._client = self._client, None
            await asyncio.to_thread(client.close)

    def classify(self, exc: Exception) -> DeliveryError:
        """Translate a boto3/botocore exception into the channel contract's errors."""
        from botocore.exceptions import (
            BotoCoreError,
            ClientError,
            HTTPClientError,
            NoCredentialsError,
            NoRegionError,
            ParamValidationError,
            PartialCredentialsError,
        )
        from botocore.exceptions import ConnectionError as BotoConnectionError

        where = f"{self.what}: {self.url}"
        endpoint = self.endpoint_url or "AWS S3"
        if isinstance(exc, ClientError):
            code = str(exc.response.get("Error", {}).get("Code", ""))
            meta = exc.response.get("ResponseMetadata", {})
            status = int(meta.get("HTTPStatusCode") or 0)
            if code == "NoSuchBucket" or status == 404:
                return ChannelBrokenError(
                    f"{where}: bucket '{self.bucket}' does not exist at {endpoint} — "
                    "create it, or fix `bucket` / `endpoint_url`"
                )
            if code in _BROKEN or status in (401, 403):
                reason = _BROKEN.get(code, f"credentials refused: {code} (HTTP {status})")
                return ChannelBrokenError(f"{where}: {reason}")
            if code in _BUSY or status in (408, 429) or status >= 500:
                retry_after = retry_after_seconds(meta.get("HTTPHeaders", {}).get("retry-after"))
                return TransientError(f"{where}: {code} (HTTP {status})", retry_after=retry_after)
            return PermanentError(f"{where}: {code} (HTTP {status})")
        if isinstance(exc, NoCredentialsError | PartialCredentialsError):
            return ChannelBrokenError(
                f"{where}: no credentials — set access_key_id and secret_access_key "
                "(or AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY)"
            )
        if isinstance(exc, NoRegionError):
            return ChannelBrokenError(f"{where}: no region — set `region`")
        if isinstance(exc, ParamValidationError):
            return ChannelBrokenError(f"{where}: invalid bucket or key: {exc}")
        if isinstance(exc, BotoConnectionError | HTTPClientError):
            # Not sure whether the write landed: retrying it is harmless.
            return TransientError(f"{where}: cannot reach {endpoint}: {type(exc).__name__}")
        if isinstance(exc, BotoCoreError):
            return TransientError(f"{where}: {type(exc).__name__}")
        raise exc
