"""Typed config models: the contract users write (documented key by key in docs/configuration.md).

Parsing is strict (unknown keys are errors, so a typo never silently disables a rule). Cross-field rules
(one owner per field, nothing sent back into its owner, eligibility expressions, ...) live in rules.py,
which runs after these models have parsed.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, field_validator, model_validator

NAME_RE = re.compile(r"^[a-z][a-z0-9_]*$")
RUNS_URL_ENV = "RECONCILE_RUNS_URL"
MEMORY_LIMIT_ENV = "RECONCILE_DUCKDB_MEMORY_LIMIT"
# DuckDB's own forms: a size ("4GB", "512MiB") or a share of the machine's memory ("25%").
MEMORY_LIMIT_RE = r"^\s*[0-9]+(\.[0-9]+)?\s*(%|[KMGT]i?B|[KMGT]|B|bytes)\s*$"
# A Celery queue name that is also usable in a task id (`extract_on_<queue>`).
QUEUE_RE = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"
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
    # File systems only: read the newest matching export, or all of them as one snapshot.
    pick: Literal["newest", "all"] | None = None
    # Columns holding another system's record key (e.g. a marketing property with the CRM GUID): a stored ID.
    external_ids: dict[str, str] = Field(default_factory=dict)

    @field_validator("fields", mode="before")
    @classmethod
    def _fields(cls, v: Any) -> Any:
        if isinstance(v, dict):
            return {k: ({"column": m} if isinstance(m, str) else m) for k, m in v.items()}
        return v



STRATEGIES = ("owner", "most_recent", "first_non_null", "most_restrictive")


class CanonicalField(_Strict):
    """A canonical field of an entity, who may write it, and how its golden value is chosen (docs/golden.md).

    The owner stays the only writable system whatever the strategy; the strategy only decides which linked
    record's value the golden record believes.
    """

    owner: str | None = None
    fallback: list[str] = Field(default_factory=list)
    send_to: list[str] = Field(default_factory=list)
    type: Literal["string", "boolean", "integer", "number", "date", "timestamp"] = "string"
    required: bool = False
    description: str | None = None
    strategy: Literal["owner", "most_recent", "first_non_null", "most_restrictive"] = "owner"
    # Systems considered, in order (first_non_null: first wins; most_recent / most_restrictive: breaks ties).
    priority: list[str] = Field(default_factory=list)
    # most_restrictive: values ranked most restrictive first; any value not listed ranks after all of them.
    restrictive_values: list[Any] = Field(default_factory=list)

    def candidate_systems(self, mapped_by: list[str]) -> list[str]:
        """Systems whose linked records may supply the golden value, in tie-break order.

        owner: the owner, then `fallback`. first_non_null: `priority` (default owner, fallback).
        most_recent / most_restrictive: `priority`, default owner, fallback, then every other system that maps
        the field (`mapped_by`), by name.
        """
        if self.strategy == "owner":
            order = [self.owner, *self.fallback]
        elif self.priority:
            order = list(self.priority)
        else:
            order = [self.owner, *self.fallback]
            if self.strategy in ("most_recent", "most_restrictive"):
                order += sorted(mapped_by)
        return [s for s in dict.fromkeys(order) if s]


Severity = Literal["error", "warn"]
GATE_KINDS = ("key_unique", "key_not_null", "required", "email_format", "picklist", "freshness", "volume",
              "duplicate_rate", "quarantine_rate")
DEFAULT_SEVERITY: dict[str, str] = {
    "key_unique": "error", "key_not_null": "error", "required": "error", "email_format": "error",
    "picklist": "warn", "freshness": "warn", "volume": "error", "duplicate_rate": "warn", "quarantine_rate": "warn",
}


class VolumeGate(_Strict):
    """Row count of a staging table within a band around the median of its last accepted runs."""

    history_runs: int | None = Field(default=None, ge=1)   # default 7
    max_growth: float | None = Field(default=None, ge=0)   # default 0.5: at most +50% over the median
    max_shrink: float | None = Field(default=None, ge=0, le=1)  # default 0.3: at most -30% under the median
    tolerance_rows: int | None = Field(default=None, ge=0)  # default 5: slack for small tables
    min_rows: int | None = Field(default=None, ge=0)       # absolute bounds, checked from the first run
    max_rows: int | None = Field(default=None, ge=0)


class DuplicateRateGate(_Strict):
    """Share of records sharing a normalised key (email; name + company) with another record of the system."""

    max_increase: float | None = Field(default=None, ge=0, le=1)  # default 0.05 over the median of history
    max: float | None = Field(default=None, ge=0, le=1)           # absolute ceiling, default none


class FreshnessGate(_Strict):
    max_age_hours: float | None = Field(default=None, gt=0)  # default: not checked


class QuarantineRateGate(_Strict):
    max: float | None = Field(default=None, ge=0, le=1)  # default 0.05


class ChangeThreshold(_Strict):
    """Above either bound a load waits for approval."""

    max: int | None = Field(default=None, ge=0)
    max_share: float | None = Field(default=None, ge=0)  # of the target's staged records


DEFAULT_CHANGE_THRESHOLDS = {
    "create": {"max": 1000, "max_share": 0.2},
    "update": {"max": 5000, "max_share": 0.1},
    "link": {"max": 1000, "max_share": 0.2},  # writing the xid touches the record (its modified time) too
    "archive": {"max": 500, "max_share": 0.01},
    "erase": {"max": 50, "max_share": None},  # a legal duty: bounded in number, not by table size
}


class GateOverrides(_Strict):
    """Gate settings for one system's staging table (overrides the entity-level ones key by key)."""

    severity: dict[str, Severity] = Field(default_factory=dict)
    volume: VolumeGate = Field(default_factory=VolumeGate)
    duplicate_rate: DuplicateRateGate = Field(default_factory=DuplicateRateGate)
    duplicate_keys: dict[str, list[str]] | None = None
    freshness: FreshnessGate = Field(default_factory=FreshnessGate)
    quarantine_rate: QuarantineRateGate = Field(default_factory=QuarantineRateGate)
    # Change thresholds per operation for writes into this system (create, update, link, archive, erase).
    changes: dict[Literal["create", "update", "link", "archive", "erase"], ChangeThreshold] = Field(
        default_factory=dict)


class GateSettings(GateOverrides):
    """`entities.<e>.gates`: defaults for every staging table of the entity, plus per-system overrides."""

    systems: dict[str, GateOverrides] = Field(default_factory=dict)

    def for_system(self, system: str) -> GateOverrides:
        """Effective settings for one system: its overrides on top of the entity level, key by key."""
        over = self.systems.get(system)
        base = self.model_dump(exclude={"systems"})
        if over is not None:
            for key, value in over.model_dump(exclude_unset=True).items():
                if isinstance(value, dict) and isinstance(base.get(key), dict) and key != "duplicate_keys":
                    base[key] = {**base[key], **{k: v for k, v in value.items() if v is not None}}
                elif value is not None:
                    base[key] = value
        return GateOverrides.model_validate(base)


class MatchRule(_Strict):
    """One identity-matching rule, tried in list order after stored IDs.

    exact: normalised values of every field equal; links only one-to-one matches whose names do not
    contradict them (docs/identity.md#the-shared-mailbox-guard).
    probabilistic: the fields are compared by the entity's Fellegi-Sunter model (docs/identity.md); pairs
    sharing a `block_on` value are scored. Thresholds are match probabilities; unset, the entity's
    `identity.link_threshold` / `identity.review_threshold` apply.
    """

    name: str
    type: Literal["exact", "probabilistic"] = "exact"
    fields: list[str]
    exact: list[str] = Field(default_factory=list)
    # Candidate pairs share the normalised value of one entry: a field, or a list of fields (a composite key).
    block_on: list[str | list[str]] = Field(default_factory=list)
    review_threshold: float | None = Field(default=None, ge=0, le=1)
    link_threshold: float | None = Field(default=None, ge=0, le=1)


class IdentitySettings(_Strict):
    """`entities.<e>.identity`: the three bands of the match model, and records that match no one."""

    # Records of systems that may not create identities and have no candidate: their own xid, or review.
    orphans: Literal["review", "create"] = "create"
    link_threshold: float = Field(default=0.999, gt=0, le=1)    # match probability that links automatically
    review_threshold: float = Field(default=0.9, gt=0, le=1)    # at or above (below link): a candidate item
    retrain_every: int = Field(default=30, ge=1)                # runs a trained model is reused for


class EntityConfig(_Strict):
    sources: dict[str, SourceConfig]
    fields: dict[str, CanonicalField]
    eligibility: dict[str, str] = Field(default_factory=dict)
    gates: GateSettings = Field(default_factory=GateSettings)
    match: list[MatchRule] = Field(default_factory=list)
    identity: IdentitySettings = Field(default_factory=IdentitySettings)


class ArchiveSettings(_Strict):
    """Soft delete: set `column` to `value` (e.g. statecode = 1). Hard delete only with `hard_delete: true`."""

    column: str | None = None
    value: Any = None
    hard_delete: bool = False


# Longest text value (characters) an API system takes where its config names no limit (HubSpot refuses
# property values over 65,535 characters; 4,000 is Dynamics' longest single-line text column).
DEFAULT_MAX_TEXT_LENGTH = {"hubspot": 65_535, "dynamics": 4_000}


class WriteLimits(_Strict):
    """`systems.<s>.writes.limits`: what a value written into this system may hold. A planned change whose
    value breaks them is held with the reason, never sent (docs/loading.md#holds)."""

    # Characters per value: the smaller of this (or `columns.<column>`) and the column's declared length
    # (VARCHAR(n), read at extract); unset: the declared length, else DEFAULT_MAX_TEXT_LENGTH by API kind.
    max_length: int | None = Field(default=None, ge=1)
    columns: dict[str, Annotated[int, Field(ge=1)]] = Field(default_factory=dict)
    # Control characters (other than tab, line feed, carriage return), bidi controls (U+202A..U+202E,
    # U+2066..U+2069) and zero-width characters (U+200B..U+200D, U+2060, U+FEFF): hold, or allow.
    characters: Literal["hold", "allow"] = "hold"


class EraseSettings(_Strict):
    """`systems.<s>.writes.erase` as a mapping: how an erasure request is carried out here. `anonymize` sets
    every column mapped to a string field to NULL, plus `columns` (named ones, or `all`: every column the
    system reports but the key and modified_at), never the `retain` ones (a legal duty to keep, e.g. billing)."""

    mode: Literal["anonymize", "delete"] = "anonymize"
    columns: list[str] | Literal["all"] = Field(default_factory=list)
    retain: list[str] = Field(default_factory=list)

    @model_validator(mode="after")
    def _anonymize_only(self) -> EraseSettings:
        if self.mode == "delete" and (self.columns or self.retain):
            raise ValueError("columns and retain apply to mode anonymize; delete removes the whole record")
        return self


class WriteSettings(_Strict):
    """`systems.<s>.writes`: what reconcile may do to this system when it is a target."""

    create: bool = False                      # create records for eligible golden records it lacks
    archive: ArchiveSettings | None = None    # archive records whose identity is gone from every identity source
    # How an erasure request is carried out here: `anonymize` (default) or `delete`, or an EraseSettings mapping.
    erase: Literal["anonymize", "delete"] | EraseSettings = "anonymize"
    blanks_overwrite: bool = False            # may an empty golden value blank out a value here?
    limits: WriteLimits = Field(default_factory=WriteLimits)  # lengths and characters a value may have

    @property
    def erase_settings(self) -> EraseSettings:
        """`erase` as settings, whichever way it was written."""
        return self.erase if isinstance(self.erase, EraseSettings) else EraseSettings(mode=self.erase)


class ApiLimits(_Strict):
    """`systems.<s>.limits`: an API system's paging, batching and retry limits (defaults: the vendor's
    documented limits, in connectors/<api>/settings.py)."""

    page_size: int | None = Field(default=None, ge=1)          # records per list page
    search_page_size: int | None = Field(default=None, ge=1)   # records per search page (HubSpot: 200)
    search_max_results: int | None = Field(default=None, ge=1)  # results one search can page through (10,000)
    batch_size: int | None = Field(default=None, ge=1)         # records per batch call (HubSpot: 100)
    max_retries: int | None = Field(default=None, ge=0)        # per call, on 429 / 5xx / network errors
    max_wait_seconds: float | None = Field(default=None, gt=0)  # longest single back-off (Retry-After is capped)
    timeout_seconds: float | None = Field(default=None, gt=0)  # per HTTP request


class SystemConfig(_Strict):
    """A business system: a SQL database (exactly one of url, url_env or connection), an API (`api`,
    `base_url` with `token_env`, or `connection`) or a folder of exports (`files`, read-only)."""

    url: str | None = None
    url_env: str | None = None
    connection: str | None = None
    api: Literal["hubspot", "dynamics"] | None = None
    base_url: str | None = None
    token_env: str | None = None
    limits: ApiLimits = Field(default_factory=ApiLimits)
    files: str | None = None
    creates_identity: bool = False
    xid_column: str | None = None
    unique: list[str] = Field(default_factory=list)
    phone_region: str | None = None
    description: str | None = None
    # Celery queue of this system's extract task (e.g. a worker inside an on-premises network); unset: the
    # executor's default queue. Ignored by the LocalExecutor.
    queue: str | None = Field(default=None, pattern=QUEUE_RE)
    writes: WriteSettings = Field(default_factory=WriteSettings)


class Defaults(_Strict):
    phone_region: str = "US"


class ExtractSettings(_Strict):
    """How extraction reads sources (see docs/configuration.md#extract)."""

    mode: Literal["incremental", "full"] = "incremental"
    overlap_minutes: int = Field(default=60, ge=0)
    full_every: int = Field(default=7, ge=1)
    batch_size: int = Field(default=10_000, ge=1)


class LoadSettings(_Strict):
    """`load`: how planned changes reach the systems (see docs/configuration.md#load)."""

    mode: Literal["dry_run", "apply"] = "dry_run"   # a new config only plans: the sync assessment
    # Records per batch (one target transaction, one journal entry); unset: the target's writer's default,
    # 2,000 into SQL, 200 into an API (whose writer calls the API in its own batches of the vendor's limit).
    batch_size: int | None = Field(default=None, ge=1)
    max_failure_rate: float = Field(default=0.05, ge=0, le=1)  # failed / attempted above this stops a load
    pause_seconds: float = Field(default=0.0, ge=0)  # between batches (rate limiting a busy system)


class DuckDBSettings(_Strict):
    """`duckdb`: what every DuckDB database reconcile opens may use (see docs/configuration.md#duckdb)."""

    # Per database (the warehouse, and the identity model's private one while it trains and scores). Past
    # it DuckDB spills joins and sorts to `temp_directory` instead of growing. DuckDB's own default is 80%.
    memory_limit: str = Field(default="25%", pattern=MEMORY_LIMIT_RE)
    threads: int | None = Field(default=None, ge=1)          # None: one per core
    temp_directory: str | None = None                        # None: <state folder>/tmp


class QueueSettings(_Strict):
    """`queues`: Celery queues of the DAG's tasks (ignored by the LocalExecutor; see docs/operations.md)."""

    # Every task that opens the working warehouse: served by the one worker that holds the warehouse disk.
    warehouse: str = Field(default="reconcile_warehouse", pattern=QUEUE_RE)


class Config(_Strict):
    """A whole deployment: systems, entities, where the warehouse lives, when to run."""

    version: Literal[1]
    warehouse: str
    schedule: str | None = "0 2 * * *"
    defaults: Defaults = Field(default_factory=Defaults)
    extract: ExtractSettings = Field(default_factory=ExtractSettings)
    systems: dict[str, SystemConfig]
    entities: dict[str, EntityConfig]
    load: LoadSettings = Field(default_factory=LoadSettings)
    # Where runs hand extracts over to the warehouse (Parquet, manifests): a path, or any fsspec URL
    # (s3://bucket/prefix, gs://..., file:///shared/...) that every worker reaches. Default: the state folder.
    runs_url: str | None = None
    queues: QueueSettings = Field(default_factory=QueueSettings)
    duckdb: DuckDBSettings = Field(default_factory=DuckDBSettings)

    _path: Path | None = PrivateAttr(default=None)
    _expressions_checked: bool = PrivateAttr(default=True)
    _lines: dict = PrivateAttr(default_factory=dict)

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

    def duckdb_settings(self) -> dict[str, object]:
        """The DuckDB settings every database reconcile opens gets: `memory_limit`
        (`$RECONCILE_DUCKDB_MEMORY_LIMIT` wins, a worker's own size), `temp_directory` (a relative path
        resolves against the config's folder; default `<state_dir>/tmp`), `threads` when set."""
        limit = os.environ.get(MEMORY_LIMIT_ENV) or self.duckdb.memory_limit
        if not re.match(MEMORY_LIMIT_RE, limit):
            from ..errors import ReconcileError

            raise ReconcileError(f"{MEMORY_LIMIT_ENV}={limit!r}: not a DuckDB memory limit (e.g. 4GB, 512MiB, 25%)")
        spill = Path(self.duckdb.temp_directory).expanduser() if self.duckdb.temp_directory else self.state_dir / "tmp"
        out: dict[str, object] = {"memory_limit": limit.strip(),
                                  "temp_directory": str(spill if spill.is_absolute() else (self.base_dir / spill).resolve())}
        if self.duckdb.threads:
            out["threads"] = self.duckdb.threads
        return out

    def system_kind(self, name: str) -> str:
        """`sql`, `files` or the API kind (`hubspot`, `dynamics`) of a system."""
        sc = self.systems[name]
        return sc.api or ("files" if sc.files else "sql")

    @property
    def runs_location(self) -> str:
        """The run storage as a path or URL: `$RECONCILE_RUNS_URL` (a deployment's choice, e.g. in
        docker-compose.yaml), else `runs_url` (a relative path resolves against the config's folder), else
        `<state_dir>/runs`."""
        url = os.environ.get(RUNS_URL_ENV) or self.runs_url
        if not url:
            return str(self.state_dir / "runs")
        if "://" in url:
            return url
        p = Path(url).expanduser()
        return str(p if p.is_absolute() else (self.base_dir / p).resolve())

    def entity(self, name: str) -> EntityConfig:
        try:
            return self.entities[name]
        except KeyError:
            from ..errors import ReconcileError

            raise ReconcileError(f"unknown entity {name!r}; configured: {', '.join(sorted(self.entities))}") from None
