"""Keep server paths out of what the API answers.

Error sentences stored on rows are written by workers, which know file paths (a missing built-in
dataset's folder, a scratch file). The API shows those sentences to callers, so it replaces every
absolute path in them with `<server path>`; the worker's log keeps the full text with the job id.
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
