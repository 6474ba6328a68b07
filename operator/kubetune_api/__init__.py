"""kubetune's API: the FineTuneJob models, their CRD, rules and storage contract.

Depends on pydantic and the standard library only, so the operator, the
trainer and the CLI can all import it cheaply.
"""

from .models import (
    API_VERSION,
    GROUP,
    KIND,
    PLURAL,
    VERSION,
    FineTuneJob,
    FineTuneJobSpec,
    FineTuneJobStatus,
    Phase,
)
from .trainer_config import TrainerConfig, load_trainer_config, spec_to_trainer_config
from .validation import (
    FieldError,
    Result,
    SpecError,
    resolve_spec,
    validate_document,
    validate_spec,
)

__all__ = [
    "API_VERSION",
    "GROUP",
    "KIND",
    "PLURAL",
    "VERSION",
    "FieldError",
    "FineTuneJob",
    "FineTuneJobSpec",
    "FineTuneJobStatus",
    "Phase",
    "Result",
    "SpecError",
    "TrainerConfig",
    "load_trainer_config",
    "resolve_spec",
    "spec_to_trainer_config",
    "validate_document",
    "validate_spec",
]
