"""The server-side `kdiga` commands: `serve`, `worker` and `admin keys ...`.

The client's `kdiga` entry point mounts them through the `kdiga.commands` entry point
(`register(app)`) when the server is installed; a client-only install lists none of them.
They use the client's printing helpers, so the one rule holds: only the CLI prints.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table
from sqlalchemy.orm import Session

from kdiga_client.cli import JsonOpt, _csv, _id_column, _print_json, console, handle_errors


def register(app: typer.Typer) -> None:
    """Add the server commands to the `kdiga` app (the `kdiga.commands` entry point)."""
    app.command()(handle_errors(serve))
    app.command()(handle_errors(worker))
    admin_app = typer.Typer(help="Administration (talks to the database directly).", no_args_is_help=True)
    keys_app = typer.Typer(help="Create, revoke and list API keys.", no_args_is_help=True)
    keys_app.command("create")(handle_errors(keys_create))
    keys_app.command("revoke")(handle_errors(keys_revoke))
    keys_app.command("list")(handle_errors(keys_list))
    admin_app.add_typer(keys_app, name="keys")
    app.add_typer(admin_app, name="admin")


# --------------------------------------------------------------------------- processes


def serve(host: Annotated[str, typer.Option(help="Interface to listen on.")] = "127.0.0.1",
          port: Annotated[int, typer.Option(help="Port of the API.")] = 8000,
          home: Annotated[Path | None, typer.Option(help="KDIGA_HOME: database, broker and artifacts.")] = None,
          workers: Annotated[int, typer.Option(help="Job worker processes to start (a validation worker runs beside them).")] = 1) -> None:
    """Run the embedded service: API + workers + embedded Redis + SQLite; restarts a process that dies (Ctrl-C stops it)."""
    from kdiga_launcher.supervisor import serve as serve_embedded

    code = serve_embedded(host=host, port=port, home=home, workers=workers)
    if code:
        raise typer.Exit(code)


def worker(queues: Annotated[str | None, typer.Option(help="Comma-separated queues (default: all).")] = None,
           concurrency: Annotated[int, typer.Option(help="Worker processes (one per GPU).")] = 1) -> None:
    """Run a Celery worker for the scale-out deployment (settings from KDIGA_* variables)."""
    from worker.launcher import start_worker

    start_worker(_csv(queues), concurrency)


# --------------------------------------------------------------------------- admin keys


def _admin_session() -> Session:
    from kdiga_service.db import get_sessionmaker
    from kdiga_service.settings import get_settings

    return get_sessionmaker(get_settings())()


def _key_dict(row: Any, secret: str | None = None) -> dict[str, Any]:
    fields = ("id", "name", "prefix", "is_admin", "max_concurrent_jobs", "created_at", "revoked_at")
    data = {f: getattr(row, f) for f in fields if hasattr(row, f)}
    data = {k: v.isoformat() if hasattr(v, "isoformat") else v for k, v in data.items()}
    if secret is not None:
        data["key"] = secret
    return data


def keys_create(name: Annotated[str, typer.Option(help="Who the key is for.")] = "default",
                admin: Annotated[bool, typer.Option("--admin", help="An admin key.")] = False,
                max_concurrent_jobs: Annotated[int | None, typer.Option(help="Active-job cap for this key.")] = None,
                json_out: JsonOpt = False) -> None:
    """Create an API key and print it (only its hash is stored: copy it now)."""
    from kdiga_service.admin import create_key

    with _admin_session() as session:
        row, secret = create_key(session, name=name, is_admin=admin, max_concurrent_jobs=max_concurrent_jobs)
        created = _key_dict(row, secret)
    if json_out:
        return _print_json(created)
    console.print(f"Created key [bold]{created['id']}[/] ({name}). Copy it now, it is not shown again:")
    typer.echo(secret)


def keys_revoke(key_id: Annotated[str, typer.Argument(help="The key's id or display prefix.")],
                json_out: JsonOpt = False) -> None:
    """Revoke an API key; requests with it get 401 from now on."""
    from kdiga_service.admin import revoke_key

    with _admin_session() as session:
        data = _key_dict(revoke_key(session, key_id=key_id))
    if json_out:
        return _print_json(data)
    console.print(f"Revoked key [bold]{data.get('id', key_id)}[/].")


def keys_list(json_out: JsonOpt = False) -> None:
    """List API keys (never the secrets)."""
    from kdiga_service.admin import list_keys

    with _admin_session() as session:
        keys = [_key_dict(k) for k in list_keys(session)]
    if json_out:
        return _print_json(keys)
    table = Table(_id_column(), "name", "prefix", "admin", "created", "revoked")
    for k in keys:
        table.add_row(str(k.get("id")), str(k.get("name")), str(k.get("prefix", "")),
                      "yes" if k.get("is_admin") else "", str(k.get("created_at") or "")[:19],
                      str(k.get("revoked_at") or "")[:19])
    console.print(table)
