"""In-app banner and status page: the public side, written as static files.

Every delivery re-renders the whole public side from the store (status JSON per
language, banner.js, the HTML status page, Atom feeds) into a folder that any host can
serve, so it stays up when the company's own infrastructure does not.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

from pydantic import Field

from broadcaster.models import Capabilities, ChannelFamily, Receipt
from channels.base import Channel, ChannelConfig, Message, PermanentError, TransientError


class BannerConfig(ChannelConfig):
    output: Path = Field(default=Path("public"), description="folder the site is written to")


class BannerChannel(Channel):
    """Publishes the status page, status JSON, banner.js and feeds to a folder."""

    family: ClassVar[ChannelFamily] = ChannelFamily.LONG
    capabilities: ClassVar[Capabilities] = Capabilities(languages="each")
    default_concurrency: ClassVar[int] = 1  # each write renders everything: one at a time
    config_model: ClassVar[type[ChannelConfig]] = BannerConfig

    config: BannerConfig

    @property
    def output(self) -> Path:
        path = self.config.output
        return path if path.is_absolute() else self.context.base_dir / path

    async def send(self, message: Message) -> Receipt:
        writer = self.context.write_public_site
        if writer is None:
            raise PermanentError(f"{self.name}: no site writer in this process")
        try:
            await writer(self.name, self.languages, self.output)
        except OSError as exc:  # a full disk or a remount may pass: retry until the deadline
            raise TransientError(
                f"{self.name}: cannot write {self.output}: {exc.strerror}"
            ) from exc
        index = self.output / "index.html"
        return Receipt(
            provider_id=f"update-{message.update_id}", permalink=index.as_uri(), delivered=True
        )

    async def check_config(self) -> list[str]:
        problems = await super().check_config()
        parent = self.output if self.output.exists() else self.output.parent
        if not parent.exists():
            problems.append(f"{self.name}: folder {parent} does not exist")
        return problems
