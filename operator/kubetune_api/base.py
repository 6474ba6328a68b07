"""The base of every spec model: camelCase aliases, unknown fields refused.

Its own module so that models.py and the modules it embeds (graders.py) share
it without importing each other.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict
from pydantic.alias_generators import to_camel


class SpecModel(BaseModel):
    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        validate_default=True,
        use_enum_values=True,
    )

    def to_dict(self) -> dict:
        """camelCase plain dict, without unset optional fields."""
        return self.model_dump(by_alias=True, exclude_none=True, mode="json")
