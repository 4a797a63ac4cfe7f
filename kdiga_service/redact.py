"""Keep server paths out of what users read (issue 16.7).

Error sentences stored on rows are written by workers, which know file paths (a missing built-in
dataset's folder, a scratch file). `kdiga_service.crud` passes every stored error through
`redact_server_paths` and the API does the same on the way out (rows written before this held
paths); the worker's log keeps the full text with the job or upload id.
"""

from __future__ import annotations

import re

# An absolute POSIX path of two or more segments, not part of a URL or of an API path (/v1/...).
_SERVER_PATH = re.compile(r"(?<![\w:/.~-])/(?!v1/)(?:[^\s/'\"`]+/)+[^\s'\"`,;:)]*")


def redact_server_paths(text: str | None) -> str | None:
    """`text` with absolute server paths replaced by `<server path>` (None stays None)."""
    if not text or "/" not in text:
        return text
    return _SERVER_PATH.sub("<server path>", text)
