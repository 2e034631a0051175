"""The companion server: serve, and token administration (admin create-device / create-reviewer /
create-publisher / revoke)."""
from __future__ import annotations

import typer

from retinaedge.cli._app import admin_app, app, console
from retinaedge.cli._common import fail


@app.command()
def serve(host: str = typer.Option("127.0.0.1"), port: int = typer.Option(8000), workers: int = typer.Option(1),
          trusted_proxy: list[str] = typer.Option(
              [], "--trusted-proxy", help="A reverse proxy (IP or network) whose X-Forwarded-For is believed, so failed "
              "sign-ins count per client; repeat for several. Default: none (RETINAEDGE_TRUSTED_PROXIES).")):
    """Run the companion API (migrations are applied at start). Settings from RETINAEDGE_* / .env."""
    import json
    import os

    import uvicorn

    if trusted_proxy:  # the workers read their settings from the environment
        os.environ["RETINAEDGE_TRUSTED_PROXIES"] = json.dumps(trusted_proxy)

    from companion_api.core.config import Settings
    from companion_api.core.db import run_migrations

    settings = Settings()
    run_migrations(settings.DATABASE_URL)
    if workers > 1 and settings.is_sqlite:
        console.print("[yellow]several workers on SQLite serialise on one file; use PostgreSQL for scale-out[/yellow]")
    # proxy_headers off: forwarded addresses are believed only from TRUSTED_PROXIES (companion_api.main), never from
    # uvicorn's default of any local peer.
    uvicorn.run("companion_api.asgi:app", host=host, port=port, workers=workers, log_level="info", proxy_headers=False)


def _admin_session():
    from companion_api.core.config import Settings
    from companion_api.core.db import make_engine, make_sessionmaker, run_migrations

    settings = Settings()
    run_migrations(settings.DATABASE_URL)
    return make_sessionmaker(make_engine(settings.DATABASE_URL))()


def _create(name: str, role: str) -> None:
    from companion_api.crud import create_principal

    with _admin_session() as session:
        try:
            token = create_principal(session=session, name=name, role=role)
        except ValueError as exc:
            fail(exc)
    console.print(f"{role} {name!r} created; the token is shown once:")
    print(token)


@admin_app.command("create-device")
def create_device(name: str):
    """Create a device token (stored hashed)."""
    _create(name, "device")


@admin_app.command("create-reviewer")
def create_reviewer(name: str):
    """Create a reviewer token (reads every device's results)."""
    _create(name, "reviewer")


@admin_app.command("create-publisher")
def create_publisher(name: str):
    """Create a publisher token (uploads signed models; the server checks them against RETINAEDGE_PUBLISHER_KEYS)."""
    _create(name, "publisher")


@admin_app.command()
def revoke(name: str):
    """Revoke a device, reviewer or publisher token."""
    from companion_api.crud import revoke_principal

    with _admin_session() as session:
        try:
            revoke_principal(session=session, name=name)
        except ValueError as exc:
            fail(exc)
    console.print(f"revoked {name!r}")
