"""kdiga's REST API, database schema and artifact storage (never imports torch or kdiga_core).

What the worker and the CLI use (keep these stable):

- `api.settings`: `Settings` (env prefix `KDIGA_`), `get_settings()`, `reset_settings()`.
- `api.db`: `get_engine(settings)`, `get_sessionmaker(settings)`, `session_scope(settings)`,
  `dispose_engines()` (call after fork).
- `api.models`: `ApiKey`, `Teacher`, `Dataset`, `Job`, `Artifact`, the state constants.
- `api.storage`: `get_storage(settings) -> ArtifactStore` (`write_stream`, `upload_file`, `write_bytes`,
  `open`, `read_bytes`, `download`, `local_path`, `exists`, `delete`, `delete_prefix`, `presigned_url`).
- `api.crud`: `claim_job`, `update_progress`, `heartbeat`, `is_cancel_requested`, `finish_job`, `fail_job`,
  `mark_cancelled`, `get_job`, `add_artifact`, `create_teacher`, `set_teacher_validated`,
  `set_dataset_validated`.
- `api.admin`: `create_key`, `revoke_key`, `list_keys`, `ensure_key`.
- `api.migrate`: `upgrade_head(settings)`.
- `api.main`: `create_app(settings=None)` (`uvicorn --factory api.main:create_app`).
"""
