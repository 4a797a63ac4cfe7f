"""The service's shared ground floor: settings, schema, crud, storage, queue names, catalog, keys.

Used by the API (`api/`), the worker (`worker/`), the migrations and the launcher. Imports
neither FastAPI, Celery nor torch (a test checks), so every one of them can depend on it.

- `settings`: `Settings` (env prefix `KDIGA_`), `get_settings()`, `reset_settings()`.
- `db`: `get_engine`, `get_sessionmaker`, `session_scope`, `dispose_engines` (call after fork).
- `models`: `ApiKey`, `Teacher`, `Dataset`, `Job`, `Artifact`, the state constants.
- `crud`: the one writer of rows (job life cycle, artifacts, teachers, datasets).
- `storage`: `get_storage(settings) -> ArtifactStore`.
- `queue`: task names and which queue each is published on.
- `catalog`: the names users pick from (generated from kdiga_core by scripts/gen_catalog.py).
- `admin`: API keys (generate, hash, create, revoke, list).
- `migrate`: `upgrade_head(settings)`.
- `redact`: `redact_server_paths(text)` (crud applies it to every stored error).
- `cpus`: `available_cpus()` (affinity and cgroup quota: the worker thread share).
"""
