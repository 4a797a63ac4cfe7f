"""The names users pick from."""

from __future__ import annotations

from fastapi import APIRouter

from api.deps import CurrentOwner
from api.errors import error_responses
from api.routing import KdigaRoute
from api.schemas import CatalogPublic
from kdiga_service.catalog import load_catalog, methods_by_kind

router = APIRouter(prefix="/catalog", tags=["catalog"], route_class=KdigaRoute,
                   responses=error_responses(401, 422))


@router.get("", response_model=CatalogPublic)
def read_catalog(owner: CurrentOwner) -> CatalogPublic:  # noqa: ARG001 - the dependency authenticates the caller
    """Architectures, attacks, methods, built-in datasets and job kinds this service accepts."""
    return CatalogPublic(**load_catalog(), methods_by_kind=methods_by_kind())
