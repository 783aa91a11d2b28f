"""Opening the store: the async engine, SQLite's settings, migrations, online backup."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, event, text
from sqlalchemy import create_engine as sa_create_engine
from sqlalchemy.exc import OperationalError
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from broadcaster.errors import BroadcasterError

MIGRATIONS = Path(__file__).with_name("migrations")
# The newest migration; a test checks it matches the migrations folder, so a store
# already at it skips Alembic (and its import) entirely.
HEAD_REVISION = "0011_distributed_dispatch"


# Execution option marking a connection that will write (see the "begin" event below).
WRITE_OPTION = "broadcaster_writes"


def is_sqlite(url: str) -> bool:
    return url.startswith("sqlite")


def sqlite_database(url: str) -> str | None:
    """The file of a SQLite URL; None for another database or an in-memory one."""
    if not is_sqlite(url) or "///" not in url:
        return None
    database = url.split("///", 1)[1]
    return database if database and database != ":memory:" else None


def create_engine(url: str) -> AsyncEngine:
    """An async engine; SQLite in WAL mode with a busy timeout, foreign keys on."""
    if is_sqlite(url):
        database = sqlite_database(url)
        if database is not None:
            Path(database).parent.mkdir(parents=True, exist_ok=True)
        # Each aiosqlite connection is a thread: keep enough of them open that a burst
        # of webhook requests does not open (and close) overflow connections, a thread
        # and four PRAGMAs each.
        engine = create_async_engine(
            url,
            connect_args={"timeout": 30},
            pool_size=16,
            max_overflow=16,
            hide_parameters=True,  # a statement's values (addresses) never in an error
        )
        _sqlite_settings(engine.sync_engine)
        return engine
    return create_async_engine(
        url, pool_size=10, max_overflow=10, pool_pre_ping=True, hide_parameters=True
    )


def create_thread_engine(url: str) -> Engine | None:
    """SQLite file stores only: a synchronous engine on the same file, for the hot
    path's transactions run whole in a worker thread (see `Store.run_in_thread`)."""
    if sqlite_database(url) is None:
        return None
    engine = sa_create_engine(
        sync_url(url),
        connect_args={"timeout": 30, "check_same_thread": False},
        pool_size=4,
        max_overflow=4,
        hide_parameters=True,
    )
    _sqlite_settings(engine)
    return engine


def _sqlite_settings(engine: Engine) -> None:
    """WAL, durability, foreign keys, busy timeout; IMMEDIATE for writing transactions."""

    @event.listens_for(engine, "connect")
    def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
        cursor = dbapi_connection.cursor()
        # WAL: readers never block the writer; NORMAL is durable across a killed
        # process (only a power cut may lose the last commits).
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA busy_timeout=30000")
        cursor.close()
        # Let SQLAlchemy say when transactions begin (the driver's implicit BEGIN
        # would be DEFERRED, which fails at once instead of waiting on a busy file).
        dbapi_connection.isolation_level = None

    @event.listens_for(engine, "begin")
    def _begin(conn: Any) -> None:
        # A writing transaction takes the write lock up front (IMMEDIATE), so two
        # processes (a CLI and a `serve`) queue on busy_timeout instead of failing on
        # a lock upgrade; a reading one takes no lock at all (WAL readers see a
        # snapshot and never block the writer).
        writes = conn.get_execution_options().get(WRITE_OPTION, False)
        conn.exec_driver_sql("BEGIN IMMEDIATE" if writes else "BEGIN")


def sync_url(url: str) -> str:
    """The same database through a synchronous driver, for Alembic."""
    return url.replace("sqlite+aiosqlite", "sqlite").replace("+asyncpg", "+psycopg")


async def current_revision(engine: AsyncEngine) -> str | None:
    try:
        async with engine.connect() as conn:
            row = (await conn.execute(text("SELECT version_num FROM alembic_version"))).first()
    except OperationalError:
        return None
    except Exception as exc:  # PostgreSQL raises ProgrammingError for a missing table
        if "alembic_version" in str(exc):
            return None
        raise
    return row[0] if row else None


def upgrade_to_head(url: str) -> None:
    """Apply every Alembic migration (synchronously: Alembic drives its own connection)."""
    from alembic import command
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.set_main_option("sqlalchemy.url", sync_url(url).replace("%", "%%"))
    command.upgrade(config, "head")


async def ensure_schema(engine: AsyncEngine, url: str) -> None:
    """Bring the store to the newest schema; cheap when it already is."""
    if await current_revision(engine) == HEAD_REVISION:
        return
    try:
        await asyncio.to_thread(upgrade_to_head, url)
    except Exception as exc:
        raise BroadcasterError(f"cannot migrate the store at {safe_url(url)}: {exc}") from exc


def safe_url(url: str) -> str:
    """The URL without its password, for messages."""
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


def backup_sqlite(database: Path, target: Path) -> None:
    """A consistent copy of a live SQLite store, through SQLite's online backup API."""
    if target.exists():
        raise BroadcasterError(f"{target} exists — choose a new file for the backup")
    source = sqlite3.connect(f"file:{database}?mode=ro", uri=True)
    try:
        destination = sqlite3.connect(target)
        try:
            source.backup(destination)
        finally:
            destination.close()
    finally:
        source.close()
