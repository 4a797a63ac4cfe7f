"""Datasets registered by reference: which URLs the operator allows, and how to reach them.

A reference names data the service reads in place (nothing is copied): a ``file://`` folder or
any fsspec URL (``s3://bucket/prefix``, ``gs://...``) under one of ``KDIGA_DATASET_ROOTS``. The
API checks the URL against the roots before it stores the row; the worker checks again before
it reads (the roots may have shrunk since), and passes `storage_options` to fsspec.
"""

from __future__ import annotations

import posixpath
from typing import Any
from urllib.parse import urlsplit

from kdiga_service.settings import Settings

REFERENCE_FORMATS: tuple[str, ...] = ("image_folder", "webdataset")
NO_ROOTS = ("Datasets by reference are turned off on this server (KDIGA_DATASET_ROOTS is empty); "
            "upload a file instead, or ask the operator to allow a data folder.")


def normalise(uri: str) -> str | None:
    """``scheme://netloc/path`` with a clean absolute path and no trailing slash; None if it is not a URL.

    ``..`` segments are refused (None) rather than resolved, so a reference cannot climb out of
    a root by spelling.
    """
    try:
        parts = urlsplit(uri.strip())
    except ValueError:  # e.g. an unbalanced '[' in the host
        return None
    if not parts.scheme or parts.query or parts.fragment or "\\" in uri:
        return None
    path = parts.path or "/"
    if ".." in path.split("/"):
        return None
    clean = posixpath.normpath("/" + path.lstrip("/")).rstrip("/")
    return f"{parts.scheme.lower()}://{parts.netloc}{clean}"


def check_reference(uri: str, roots: list[str]) -> str | None:
    """One sentence saying why ``uri`` may not be registered, or None when it lies under a root."""
    if not roots:
        return NO_ROOTS
    clean = normalise(uri)
    if clean is None:
        return "The dataset uri must be a URL like file:///data/set or s3://bucket/prefix, without '..'."
    for root in roots:
        allowed = normalise(root)
        if allowed is not None and (clean == allowed or clean.startswith(allowed.rstrip("/") + "/")):
            return None
    return f"The dataset uri is not under an allowed data root ({', '.join(roots)})."


def storage_options(uri: str, s: Settings) -> dict[str, Any]:
    """fsspec options for ``uri``: the S3 endpoint and keys from the settings for ``s3://``."""
    if not uri.startswith(("s3://", "s3a://")):
        return {}
    options: dict[str, Any] = {}
    if s.s3_endpoint_url:
        options["endpoint_url"] = s.s3_endpoint_url
    if s.s3_access_key_id:
        options["key"] = s.s3_access_key_id
    if s.s3_secret_access_key:
        options["secret"] = s.s3_secret_access_key.get_secret_value()
    if s.s3_region:
        options["client_kwargs"] = {"region_name": s.s3_region}
    return options
