"""Typed config models: the contract users write (documented key by key in docs/configuration.md).

Parsing is strict (unknown keys are errors, so a typo never silently disables a rule). Cross-field rules
(one owner per field, nothing sent back into its owner, eligibility expressions, ...) live in rules.py,
which runs after these models have parsed.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, field_validator

NAME_RE = re.compile(r"^[a-z][a-z0-9_]*$")
FIELD_TYPES = ("string", "boolean", "integer", "number", "date", "timestamp")
SIMPLE_TRANSFORMS = ("email", "phone", "trim", "lower", "upper")
TRANSFORM_NAMES = SIMPLE_TRANSFORMS + ("map",)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=False)


class TransformStep(_Strict):
    """One normalised transform step: `name` plus its options (`mapping` for map, `region` for phone)."""

    name: Literal["email", "phone", "trim", "lower", "upper", "map"]
    mapping: dict[str, Any] | None = None
    region: str | None = None


def _parse_transform(spec: Any) -> list[TransformStep]:
    """Accept `email`, `{map: {...}}`, `{phone: {region: GB}}` or a list of these, applied in order."""
    if spec is None:
        return []
    if isinstance(spec, list):
        steps: list[TransformStep] = []
        for item in spec:
            steps.extend(_parse_transform(item))
        return steps
    if isinstance(spec, TransformStep):
        return [spec]
    if isinstance(spec, str):
        if spec not in SIMPLE_TRANSFORMS:
            raise ValueError(
                f"unknown transform {spec!r}; expected one of {', '.join(SIMPLE_TRANSFORMS)} or {{map: {{...}}}}"
            )
        return [TransformStep(name=spec)]
    if isinstance(spec, dict):
        if len(spec) != 1:
            raise ValueError(f"a transform mapping has exactly one key (e.g. {{map: {{...}}}}), got {sorted(spec)}")
        (name, opts), = spec.items()
        if name == "map":
            if not isinstance(opts, dict) or not opts:
                raise ValueError("transform 'map' needs a non-empty mapping of source value -> canonical value")
            return [TransformStep(name="map", mapping={str(k): v for k, v in opts.items()})]
        if name == "phone":
            region = (opts or {}).get("region") if isinstance(opts, dict) else None
            if isinstance(opts, dict) and set(opts) - {"region"}:
                raise ValueError(f"transform 'phone' accepts only 'region', got {sorted(opts)}")
            return [TransformStep(name="phone", region=region)]
        if name in SIMPLE_TRANSFORMS:
            return [TransformStep(name=name)]
        raise ValueError(f"unknown transform {name!r}; expected one of {', '.join(TRANSFORM_NAMES)}")
    raise ValueError(f"a transform is a name, a one-key mapping or a list, got {type(spec).__name__}")


class FieldMapping(_Strict):
    """How one canonical field is read from a source: a column and optional transforms."""

    column: str
    # As written by the user; checked by rules.py (so every bad transform is reported, not only the first).
    transform: str | dict[str, Any] | list[Any] | None = None

    @property
    def steps(self) -> list[TransformStep]:
        """The transform as normalised steps, applied in order."""
        return _parse_transform(self.transform)


class SourceConfig(_Strict):
    """Where an entity lives in one system: a table or a query, its key, its modified time, field mappings."""

    table: str | None = None
    query: str | None = None
    key: str
    modified_at: str | None = None
    fields: dict[str, FieldMapping]
    batch_size: int | None = Field(default=None, ge=1)

    @field_validator("fields", mode="before")
    @classmethod
    def _fields(cls, v: Any) -> Any:
        if isinstance(v, dict):
            return {k: ({"column": m} if isinstance(m, str) else m) for k, m in v.items()}
        return v



class CanonicalField(_Strict):
    """A canonical field of an entity and who may write it."""

    owner: str | None = None
    fallback: list[str] = Field(default_factory=list)
    send_to: list[str] = Field(default_factory=list)
    type: Literal["string", "boolean", "integer", "number", "date", "timestamp"] = "string"
    required: bool = False
    description: str | None = None


class EntityConfig(_Strict):
    sources: dict[str, SourceConfig]
    fields: dict[str, CanonicalField]
    eligibility: dict[str, str] = Field(default_factory=dict)


class SystemConfig(_Strict):
    """A business system. Exactly one of url (no password inline), url_env or connection."""

    url: str | None = None
    url_env: str | None = None
    connection: str | None = None
    creates_identity: bool = False
    xid_column: str | None = None
    unique: list[str] = Field(default_factory=list)
    phone_region: str | None = None
    description: str | None = None


class Defaults(_Strict):
    phone_region: str = "US"


class ExtractSettings(_Strict):
    """How extraction reads sources (see docs/configuration.md#extract)."""

    mode: Literal["incremental", "full"] = "incremental"
    overlap_minutes: int = Field(default=60, ge=0)
    full_every: int = Field(default=7, ge=1)
    batch_size: int = Field(default=10_000, ge=1)


class Config(_Strict):
    """A whole deployment: systems, entities, where the warehouse lives, when to run."""

    version: Literal[1]
    warehouse: str
    schedule: str | None = "0 2 * * *"
    defaults: Defaults = Field(default_factory=Defaults)
    extract: ExtractSettings = Field(default_factory=ExtractSettings)
    systems: dict[str, SystemConfig]
    entities: dict[str, EntityConfig]

    _path: Path | None = PrivateAttr(default=None)

    @property
    def path(self) -> Path | None:
        """The config file this was loaded from (None when built from a dict)."""
        return self._path

    @property
    def base_dir(self) -> Path:
        """Relative paths in the config resolve against the config file's folder."""
        return self._path.parent if self._path else Path.cwd()

    @property
    def warehouse_path(self) -> Path:
        """The published warehouse analysts open."""
        p = Path(self.warehouse).expanduser()
        return p if p.is_absolute() else (self.base_dir / p).resolve()

    @property
    def state_dir(self) -> Path:
        """Private working area beside the published warehouse: working DB, run folders, locks."""
        wp = self.warehouse_path
        return wp.parent / f".{wp.stem}.state"

    def entity(self, name: str) -> EntityConfig:
        try:
            return self.entities[name]
        except KeyError:
            from ..errors import ReconcileError

            raise ReconcileError(f"unknown entity {name!r}; configured: {', '.join(sorted(self.entities))}") from None
