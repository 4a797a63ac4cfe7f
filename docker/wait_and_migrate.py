"""One-shot `migrate` entrypoint: wait for the database, upgrade the schema, then exit.

Also creates the bootstrap admin key (KDIGA_BOOTSTRAP_ADMIN_KEY) when one is set, so a fresh
deployment has a key to start with. Exit codes: 0 done, 1 the database never answered, 2 the
migration failed. Several replicas may run at once: migrations take a PostgreSQL advisory lock.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sqlalchemy import text  # noqa: E402

from kdiga_service.db import make_engine  # noqa: E402
from kdiga_service.settings import Settings, get_settings  # noqa: E402

log = logging.getLogger("kdiga.migrate")


def wait_for_database(settings: Settings, timeout_s: float) -> bool:
    """Try `SELECT 1` until it works or `timeout_s` passes."""
    engine = make_engine(settings)
    deadline = time.monotonic() + timeout_s
    delay = 0.5
    try:
        while True:
            try:
                with engine.connect() as conn:
                    conn.execute(text("SELECT 1"))
                return True
            except Exception as exc:  # noqa: BLE001 - any connection error means "not yet"
                if time.monotonic() + delay > deadline:
                    log.error("the database did not answer within %.0f s: %s", timeout_s, _first_line(exc))
                    return False
                log.info("waiting for the database: %s", _first_line(exc))
                time.sleep(delay)
                delay = min(delay * 1.5, 5.0)
    finally:
        engine.dispose()


def _first_line(exc: Exception) -> str:
    text_ = str(exc).strip().splitlines()
    return (text_[0] if text_ else type(exc).__name__)[:200].replace('"', "'")


def bootstrap_admin_key(settings: Settings) -> None:
    if settings.bootstrap_admin_key is None:
        return
    from kdiga_service.admin import ensure_key
    from kdiga_service.db import get_sessionmaker

    with get_sessionmaker(settings)() as session:
        row = ensure_key(session, secret=settings.bootstrap_admin_key.get_secret_value(), name="bootstrap-admin")
    log.info("bootstrap admin key present (prefix %s)", row.prefix)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--timeout", type=float, default=120.0, help="Seconds to wait for the database.")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format='{"level": "%(levelname)s", "logger": "%(name)s", "msg": "%(message)s"}')
    settings = get_settings()
    if not wait_for_database(settings, args.timeout):
        return 1
    try:
        from kdiga_service.migrate import upgrade_head

        upgrade_head(settings)
        bootstrap_admin_key(settings)
    except Exception:  # noqa: BLE001 - reported and turned into the exit code
        log.exception("migration failed")
        return 2
    print(json.dumps({"migrated": True}), flush=True)  # noqa: T201 - a one-shot command's result
    return 0


if __name__ == "__main__":
    sys.exit(main())
