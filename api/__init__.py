"""kdiga's REST API: HTTP only (routes, deps, errors, uploads, metrics, the status reader, the sweeper).

`api.main.create_app(settings=None)` builds the app (`uvicorn --factory api.main:create_app`). Rows,
storage, settings and task names come from `kdiga_service`; tasks are published by name
(`api.publish`). Never imports torch or kdiga_core: the API image stays small and CPU-only.
"""
