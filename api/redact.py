"""Keep server paths out of what the API answers (the rule lives in `kdiga_service.redact`).

Error sentences stored on rows are written by workers, which know file paths (a missing built-in
dataset's folder, a scratch file). crud redacts them when they are stored; the API redacts again on
the way out, for rows stored before that; the worker's log keeps the full text with the job id.
"""

from __future__ import annotations

from kdiga_service.redact import redact_server_paths

__all__ = ["redact_server_paths"]
