"""Model registry. Importing this package registers every model family."""

from mtrec.models import moe, ple, shared_bottom  # noqa: F401  (registration side effects)
from mtrec.models import soft_sharing  # noqa: F401
from mtrec.models import sharing  # noqa: F401
from mtrec.models import cross_stitch  # noqa: F401
from mtrec.models import mlmmoe  # noqa: F401
from mtrec.models import snr  # noqa: F401
from mtrec.models import adatt  # noqa: F401
from mtrec.models import esmm  # noqa: F401
from mtrec.models import esm2  # noqa: F401
from mtrec.models import escm2  # noqa: F401
from mtrec.models import aitm  # noqa: F401
from mtrec.models import metaheac  # noqa: F401
from mtrec.models.base import MODELS, ModelConfig, ModelOutput, MultiTaskModel, build_model, validate_model_options

__all__ = ["MODELS", "ModelConfig", "ModelOutput", "MultiTaskModel", "build_model", "validate_model_options"]
