"""The `?label=key=value` list filter (repeatable; every label must match)."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, HTTPException, Query, status

from api.schemas_mlops import check_labels


def label_filter(
    label: Annotated[
        list[str] | None,
        Query(description="`key=value`; repeat it to require several labels (all must match)."),
    ] = None,
) -> dict[str, str]:
    """The labels a list must match, or 422 with one sentence."""
    wanted: dict[str, str] = {}
    for item in label or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT,
                                f"The label filter '{item[:80]}' must look like 'key=value'.")
        wanted[key] = value
    try:
        return check_labels(wanted)
    except ValueError as exc:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, f"Invalid label filter: {exc}.") from None


LabelFilterDep = Annotated[dict[str, str], Depends(label_filter)]
