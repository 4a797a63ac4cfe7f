"""kdiga_core: knowledge distillation with input gradient alignment (KDIGA), standalone.

torch + timm only: models, data, losses, attacks, training, evaluation, export.
No web, queue or database import. Import the submodules you need, e.g.
`from kdiga_core.models import create_model`.
"""

__version__ = "0.1.0"
