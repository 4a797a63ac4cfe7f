"""The one reader of JSON that arrives from callers: request bodies and multipart `metadata` parts.

Python's `json.loads` accepts what the API must refuse: bytes that are not UTF-8 (it guesses),
`NaN`/`Infinity` (stored as null, or refused by PostgreSQL later), numbers like 1e999 (parsed as
infinity), nesting deep enough to raise RecursionError, NUL characters (PostgreSQL text cannot
hold them) and lone surrogates from "\\ud800" escapes (not Unicode: no database driver can encode
them). `read_json` refuses each with one sentence (`JSONInputError`, a 413 for size and a 422 for
the rest), so a route never meets them.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

_BAD_TEXT = re.compile("[\x00\ud800-\udfff]")  # NUL, and UTF-16 surrogates that "\\ud800" escapes make
MAX_DEPTH = 32  # the deepest job spec is 4 levels; 32 leaves room and stays far from recursion limits


class JSONInputError(ValueError):
    """Caller JSON was refused; `status` and the sentence (str(exc)) go into the 4xx answer."""

    def __init__(self, sentence: str, status: int = 422):
        super().__init__(sentence)
        self.status = status


def _refuse_constant(name: str) -> Any:
    raise JSONInputError(f"{{what}} holds {name}; numbers must be finite.")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise JSONInputError(f"{{what}} holds the number {text[:40]}, which is out of range; numbers must be finite.")
    return value


def read_json(raw: bytes | str, *, what: str = "The request body", max_bytes: int,
              max_depth: int = MAX_DEPTH) -> Any:
    """Parse caller JSON, or raise JSONInputError with one sentence that starts with `what`."""
    if len(raw) > max_bytes:
        raise JSONInputError(f"{what} is larger than the limit of {max_bytes} bytes.", status=413)
    try:
        text = raw.decode("utf-8") if isinstance(raw, bytes) else raw
        data = json.loads(text, parse_constant=_refuse_constant, parse_float=_finite_float)
    except JSONInputError as exc:
        raise JSONInputError(str(exc).replace("{what}", what)) from None
    except UnicodeDecodeError:
        raise JSONInputError(f"{what} is not valid JSON: it must be UTF-8 text.") from None
    except RecursionError:
        raise JSONInputError(f"{what} nests deeper than {max_depth} levels.") from None
    except ValueError:  # JSONDecodeError, and integers longer than Python's 4300-digit limit
        raise JSONInputError(f"{what} is not valid JSON.") from None
    check_tree(data, what=what, max_depth=max_depth)
    return data


def _check_text(text: str, what: str, where: str) -> None:
    bad = _BAD_TEXT.search(text)
    if bad is None:
        return
    if bad.group() == "\x00":
        raise JSONInputError(f"{what} holds a NUL character in a {where}, which is not allowed.")
    raise JSONInputError(f"{what} holds an unpaired surrogate (\\ud800-\\udfff) in a {where}, "
                         "which is not valid Unicode.")


def check_tree(data: Any, *, what: str, max_depth: int = MAX_DEPTH) -> None:
    """Refuse nesting deeper than `max_depth`, and NUL characters or lone surrogates (which no
    database can store as text) in any key or string; iteratively, so depth cannot hurt."""
    stack: list[tuple[Any, int]] = [(data, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, str):
            _check_text(node, what, "text value")
            continue
        if not isinstance(node, dict | list):
            continue
        if depth > max_depth:
            raise JSONInputError(f"{what} nests deeper than {max_depth} levels.")
        items = list(node.items()) if isinstance(node, dict) else [(None, v) for v in node]
        for key, value in items:
            if key is not None:
                _check_text(key, what, "key")
            stack.append((value, depth + 1))
