"""diffusers-tread: TREAD token routing (arXiv 2501.04765) for Hugging Face Diffusers.

Importing this package registers it with Diffusers' pipeline loader, so that ``save_pretrained`` records the
transformer as ``["diffusers_tread", "TreadTransformer2DModel"]`` (or ``"TreadSSM2DModel"``) and
``TreadDiTPipeline.from_pretrained`` resolves it from a local folder and from the Hub alike. Diffusers only downloads
components whose library it knows (``LOADABLE_CLASSES``) and, since 0.42, only resolves libraries that are already
imported; hence the in-place registration and the eager imports below. This relies on a Diffusers internal
(`compat.register_loadable_library`; supported releases in setup.py, tested ones in .ci/run), and
``tests/test_pipeline_tread_dit.py`` simulates a Hub download to catch a change
(``test_hub_simulation_catches_the_unregistered_library_trap``).
"""

from diffusers import ModelMixin  # noqa: F401  (the loader looks up `diffusers_tread.ModelMixin`)

from .compat import register_loadable_library

register_loadable_library(__name__)

from . import models, routing  # noqa: E402
from .models import *  # noqa: E402, F403  (the names of `models.__all__`)
from .pipelines import TreadDiTPipeline  # noqa: E402

__version__ = "0.1.0"
# The models' public names (listed once, in `models.__all__`), the pipeline and the routing module.
__all__ = [*models.__all__, "TreadDiTPipeline", "routing"]
