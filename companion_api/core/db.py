"""Engine, sessions and migrations (Alembic, applied at start)."""
from __future__ import annotations

from pathlib import Path

from sqlalchemy import create_engine, event
from sqlalchemy.engine import Engine
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import sessionmaker

HERE = Path(__file__).resolve().parents[1]


def make_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30}, hide_parameters=True)

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(conn, _):
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA foreign_keys=ON")

        return engine
    # hide_parameters: a database error's message (and any traceback logged with it) must not carry the
    # bound values: result payloads, token hashes.
    engine = create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=20, hide_parameters=True)

    @event.listens_for(engine, "handle_error")
    def _primary_message_only(context) -> None:
        # PostgreSQL adds "DETAIL: Failing row contains (...)" / "Key (...)=(...)": the row's values. Keep the
        # primary message (what failed, on which column) and the SQLSTATE; drop the values.
        original = context.original_exception
        primary = getattr(getattr(original, "diag", None), "message_primary", None)
        if not primary or not isinstance(context.sqlalchemy_exception, DBAPIError):
            return None
        original.args = (primary,)
        # The wrapper formatted its message from the original already: build it again from the terse one.
        return DBAPIError.instance(context.statement, context.parameters, original, context.dialect.loaded_dbapi.Error,
                                   hide_parameters=True, dialect=context.dialect,
                                   connection_invalidated=context.is_disconnect)

    return engine


def make_sessionmaker(engine: Engine) -> sessionmaker:
    return sessionmaker(bind=engine, expire_on_commit=False)


def run_migrations(url: str) -> None:
    """alembic upgrade head, with the URL from settings (not alembic.ini)."""
    from alembic import command
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(HERE / "alembic"))
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    command.upgrade(config, "head")
