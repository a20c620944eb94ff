"""Model registry. Importing this package registers every model family."""

from mtrec.models import (  # noqa: F401  (registration side effects)
    adatt,  # noqa: F401
    aitm,  # noqa: F401
    cross_stitch,  # noqa: F401
    escm2,  # noqa: F401
    esm2,  # noqa: F401
    esmm,  # noqa: F401
    metaheac,  # noqa: F401
    mlmmoe,  # noqa: F401
    moe,
    ple,
    shared_bottom,
    sharing,  # noqa: F401
    snr,  # noqa: F401
    soft_sharing,  # noqa: F401
)
from mtrec.models.base import MODELS, ModelConfig, ModelOutput, MultiTaskModel, build_model, validate_model_options

__all__ = ["MODELS", "ModelConfig", "ModelOutput", "MultiTaskModel", "build_model", "validate_model_options"]
