"""In-app banner and status page: the public side, written as static files.

A delivery re-renders the whole public side from the store (status JSON per language,
banner.js, the HTML status page, Atom feeds) — one render for all the deliveries in
flight together — and writes it to a folder, to an S3-compatible bucket, or both, so
any static host or CDN can serve it while the company's own infrastructure is down.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from pathlib import Path
from typing import ClassVar, Self

from pydantic import AnyHttpUrl, Field, SecretStr, model_validator

from broadcaster.errors import BroadcasterError
from broadcaster.models import Capabilities, ChannelFamily, Receipt
from broadcaster.site.render import write_site
from channels.base import (
    Channel,
    ChannelBrokenError,
    ChannelConfig,
    ChannelContext,
    DeliveryError,
    Message,
    PermanentError,
    Recipient,
    SecretRef,
    TransientError,
)
from channels.site_bucket import SiteBucket, bucket_prefix, parse_bucket_url

_BUCKET_ONLY = (
    "prefix",
    "endpoint_url",
    "region",
    "path_style",
    "access_key_id",
    "secret_access_key",
)


class BannerConfig(ChannelConfig):
    output: Path | None = Field(
        default=None,
        description="folder the site is written to; default 'public' unless a bucket is set",
    )
    bucket: str | None = Field(
        default=None, description="S3-compatible bucket the site is uploaded to"
    )
    prefix: str = Field(default="", description="key prefix in the bucket, e.g. 'status/'")
    endpoint_url: AnyHttpUrl | None = Field(
        default=None, description="S3 API endpoint of a non-AWS host (R2, B2, MinIO, Spaces)"
    )
    region: str | None = Field(default=None, description="the bucket's region ('auto' on R2)")
    path_style: bool = Field(
        default=False, description="address the bucket as endpoint/bucket (MinIO, most self-hosts)"
    )
    access_key_id: SecretRef | None = Field(
        default=None, description="from env or file; with neither key, boto3's own chain is used"
    )
    secret_access_key: SecretRef | None = None

    @model_validator(mode="after")
    def _folder_or_bucket(self) -> Self:
        if self.bucket is None:
            given = [key for key in _BUCKET_ONLY if getattr(self, key)]
            if given:
                raise ValueError(f"{', '.join(given)}: only used with `bucket`, which is not set")
            if self.output is None:
                self.output = Path("public")
        if (self.access_key_id is None) != (self.secret_access_key is None):
            raise ValueError("set both access_key_id and secret_access_key, or neither")
        self.prefix = bucket_prefix(self.prefix)
        return self


class BannerChannel(Channel):
    """Publishes the status page, status JSON, banner.js and feeds to a folder and/or a bucket."""

    family: ClassVar[ChannelFamily] = ChannelFamily.LONG
    # The site shows the store: an edit or a delete is one more render of it, without
    # the corrected or retracted update.
    capabilities: Capabilities = Capabilities(edits=True, deletes=True, languages="each")
    # Every send joins one shared write of the whole site (see `_publish_site`): many
    # deliveries in flight cost one render per round, not one each.
    default_concurrency: ClassVar[int] = 64
    config_model: ClassVar[type[ChannelConfig]] = BannerConfig

    config: BannerConfig

    def __init__(self, name: str, config: ChannelConfig, context: ChannelContext) -> None:
        super().__init__(name, config, context)
        bucket = self.config.bucket
        self.bucket = self.site_bucket(bucket, self.config.prefix) if bucket else None
        self._writing = asyncio.Lock()
        self._next_round: asyncio.Task[str | None] | None = None

    @property
    def output(self) -> Path | None:
        path = self.config.output
        if path is None:
            return None
        return path if path.is_absolute() else self.context.base_dir / path

    def secrets(self) -> Mapping[str, SecretRef]:
        refs = {
            "access_key_id": self.config.access_key_id,
            "secret_access_key": self.config.secret_access_key,
        }
        return {key: ref for key, ref in refs.items() if ref is not None}

    def _credentials(self) -> tuple[SecretStr, SecretStr] | None:
        """The bucket keys; None lets boto3 find its own (AWS_* env, profile, instance role)."""
        key_ref, secret_ref = self.config.access_key_id, self.config.secret_access_key
        if key_ref is None or secret_ref is None:
            return None
        key_id, secret = self.secret(key_ref), self.secret(secret_ref)
        if key_id is not None and secret is not None:
            return key_id, secret
        key, ref = (
            ("access_key_id", key_ref) if key_id is None else ("secret_access_key", secret_ref)
        )
        raise ChannelBrokenError(f"{self.name}: secret '{key}' not found in {ref.describe()}")

    def site_bucket(self, bucket: str, prefix: str) -> SiteBucket:
        """A bucket target reached with this channel's endpoint, region and credentials."""
        endpoint = self.config.endpoint_url
        return SiteBucket(
            what=self.name,
            bucket=bucket,
            prefix=prefix,
            endpoint_url=str(endpoint).rstrip("/") if endpoint else None,
            region=self.config.region,
            path_style=self.config.path_style,
            credentials=self._credentials,
        )

    async def _render(self) -> dict[str, bytes]:
        render = self.context.render_public_site
        if render is None:
            raise PermanentError(f"{self.name}: no site renderer in this process")
        return await render(self.name, self.languages)

    async def _write_folder(self, files: dict[str, bytes], folder: Path) -> None:
        try:
            await asyncio.to_thread(write_site, files, folder)
        except OSError as exc:  # a full disk or a remount may pass: retry until the deadline
            raise TransientError(f"{self.name}: cannot write {folder}: {exc.strerror}") from exc

    async def send(self, message: Message) -> Receipt:
        permalink = await self._publish_site()
        return Receipt(
            provider_id=f"update-{message.update_id}", permalink=permalink, delivered=True
        )

    async def edit(self, provider_id: str, message: Message) -> Receipt:
        return await self.send(message)

    async def delete(self, provider_id: str, recipient: Recipient) -> None:
        await self._publish_site()

    async def _publish_site(self) -> str | None:
        """Render and write the site once for every send waiting for it.

        The site shows the whole store, not one update: a send that arrives while a
        write runs joins the next round, which starts (and reads the store) after it
        joined, so its update is in; an alert storm costs a render per round, not per
        delivery. A failed round fails (and retries) every send that joined it."""
        if self._next_round is None:
            self._next_round = asyncio.create_task(self._write_round())
        return await asyncio.shield(self._next_round)

    async def _write_round(self) -> str | None:
        async with self._writing:
            self._next_round = None  # sends from now on wait for the round after this
            files = await self._render()
            permalink = None
            # The local copy first: it cannot be half-written, and the bucket may be slow.
            if self.output is not None:
                await self._write_folder(files, self.output)
                permalink = (self.output / "index.html").as_uri()
            if self.bucket is not None:
                await self.bucket.upload(files)
                permalink = permalink or f"{self.bucket.url}index.html"
            return permalink

    async def export(self, target: str) -> int:
        """Write the public side now to a folder or an s3://bucket/prefix URL (reached with
        this channel's endpoint and credentials); return the number of files."""
        try:
            files = await self._render()
            if target.startswith("s3://"):
                site_bucket = self.site_bucket(*parse_bucket_url(target))
                try:
                    await site_bucket.upload(files)
                finally:
                    await site_bucket.close()
            else:
                await self._write_folder(files, Path(target))
        except DeliveryError as exc:
            raise BroadcasterError(str(exc)) from None
        return len(files)

    async def close(self) -> None:
        if self.bucket is not None:
            await self.bucket.close()

    async def check_config(self) -> list[str]:
        problems = await super().check_config()
        secrets_found = not problems
        if self.output is not None:
            parent = self.output if self.output.exists() else self.output.parent
            if not parent.exists():
                problems.append(f"{self.name}: folder {parent} does not exist")
        if self.bucket is not None and secrets_found:
            problem = await self.bucket.problem()
            if problem is not None:
                problems.append(problem)
        return problems
