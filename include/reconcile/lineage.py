"""Lineage as data: which datasets each step of an entity's run reads and writes, for a data catalogue.

`task_lineage(cfg, entity)` describes, per Airflow task id, its input and output datasets: the business
systems' source tables (namespace `reconcile://<system>`; connection details stay out of it, they may be
secrets) and the warehouse tables (namespace `duckdb://<published warehouse path>`, name `<schema>.<table>`),
with the golden table's columns saying where each golden field comes from (owner, fallbacks, strategy).
Column lineage: each column of a staging table comes from its system's source column, each golden field from
the source columns of the systems that may supply it (`Dataset.sources`), which the DAG emits as OpenLineage's
`columnLineage` facet. The DAG turns these into OpenLineage datasets (Airflow's OpenLineage provider emits them
with every task event).
Plain values only: reads the config, never Airflow, the warehouse or a system. Called by dags/reconcile_dags.py.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .config.models import Config


@dataclass(frozen=True)
class ColumnSource:
    """A column another dataset's column is computed from: dataset (namespace, name), field, how."""

    namespace: str
    name: str
    field: str
    subtype: str       # OpenLineage's DIRECT transformation subtype: IDENTITY (copied) or TRANSFORMATION
    description: str   # e.g. "owner (transform: email)", "fallback 1"


@dataclass(frozen=True)
class Dataset:
    """One dataset: OpenLineage's namespace and name (`<database>.<table>`), optional columns and description."""

    namespace: str
    database: str
    table: str
    description: str | None = None
    columns: tuple[tuple[str, str, str | None], ...] = field(default=())  # (name, type, description)
    sources: tuple[tuple[str, tuple[ColumnSource, ...]], ...] = field(default=())  # column -> where from

    @property
    def name(self) -> str:
        return f"{self.database}.{self.table}"


def system_dataset(cfg: Config, entity: str, system: str) -> Dataset:
    """A system's source of the entity: its table, or `query` for a query source."""
    source = cfg.entities[entity].sources[system]
    table = source.table or "query"
    columns = tuple((m.column, "string", f"read as {entity}.{name}") for name, m in source.fields.items())
    return Dataset(f"reconcile://{system}", system, table,
                   description=cfg.systems[system].description or f"{entity} records in {system}", columns=columns)


def warehouse_dataset(cfg: Config, table: str, description: str | None = None,
                      columns: tuple[tuple[str, str, str | None], ...] = (),
                      sources: tuple[tuple[str, tuple[ColumnSource, ...]], ...] = ()) -> Dataset:
    schema, name = table.split(".", 1)
    return Dataset(f"duckdb://{cfg.warehouse_path}", schema, name, description=description, columns=columns,
                   sources=sources)


def _source_column(cfg: Config, entity: str, system: str, name: str, role: str) -> ColumnSource:
    """The source column of `system` that field `name` of `entity` is read from; `role` says why it is used."""
    source = system_dataset(cfg, entity, system)
    mapping = cfg.entities[entity].sources[system].fields[name]
    if mapping.transform is None:
        return ColumnSource(source.namespace, source.name, mapping.column, "IDENTITY", role)
    return ColumnSource(source.namespace, source.name, mapping.column, "TRANSFORMATION",
                        f"{role} (transform: {mapping.transform})")


def golden_sources(cfg: Config, entity: str) -> tuple[tuple[str, tuple[ColumnSource, ...]], ...]:
    """Each golden field's source columns: those of the systems that may supply its value (`candidate_systems`:
    the owner, then fallbacks or the strategy's priority) and map it; `xid` comes from identity.xref."""
    ent = cfg.entities[entity]
    xref = warehouse_dataset(cfg, "identity.xref")
    out = [("xid", (ColumnSource(xref.namespace, xref.name, "xid", "IDENTITY", "cross-system id of the linked records"),))]
    for name, spec in ent.fields.items():
        mapped = sorted(s for s, src in ent.sources.items() if name in src.fields)
        systems = [s for s in spec.candidate_systems(mapped) if s in mapped]
        roles = {spec.owner: "owner", **{s: f"fallback {i}" for i, s in enumerate(spec.fallback, 1)}}
        out.append((name, tuple(_source_column(cfg, entity, s, name, f"{roles.get(s, 'candidate')}; strategy "
                                                                     f"{spec.strategy}") for s in systems)))
    return tuple(out)


def _provenance(cfg: Config, entity: str, name: str) -> str:
    """Where a golden field's value comes from, in words a catalogue shows beside the column."""
    ent = cfg.entities[entity]
    spec = ent.fields[name]
    mapped = sorted(s for s, src in ent.sources.items() if name in src.fields)
    systems = spec.candidate_systems(mapped)
    where = ", ".join(f"staging.{s}__{entity}.{name}" for s in systems)
    text = f"owner {spec.owner}; strategy {spec.strategy}; from {where}"
    if spec.send_to:
        text += f"; written to {', '.join(spec.send_to)}"
    return text


def task_lineage(cfg: Config, entity: str) -> dict[str, dict[str, list[Dataset]]]:
    """task id -> {"inputs": [...], "outputs": [...]} for the DAG `reconcile_<entity>` (mapped tasks: every
    system they are mapped over; `extract` covers each extract task, whatever its queue)."""
    ent = cfg.entities[entity]
    systems = sorted(ent.sources)
    sources = [system_dataset(cfg, entity, s) for s in systems]
    staging = [warehouse_dataset(cfg, f"staging.{s}__{entity}", f"{entity} records staged from {s}",
                                 tuple((f, ent.fields[f].type, f"{s} column {m.column}")
                                       for f, m in ent.sources[s].fields.items() if f in ent.fields),
                                 tuple((f, (_source_column(cfg, entity, s, f, "read"),))
                                       for f in ent.sources[s].fields if f in ent.fields))
               for s in systems]
    golden = warehouse_dataset(cfg, f"golden.{entity}", f"golden {entity} records, one per cross-system id",
                               (("xid", "string", "cross-system id (identity.xref)"),) +
                               tuple((f, spec.type, _provenance(cfg, entity, f)) for f, spec in ent.fields.items()),
                               golden_sources(cfg, entity))
    lineage = warehouse_dataset(cfg, f"golden.{entity}_lineage", "which system and record each golden value came from")
    xref = warehouse_dataset(cfg, "identity.xref", "links of every system's records to cross-system ids")
    changes = warehouse_dataset(cfg, "audit.changes", "changes planned per target system, and their outcome")
    targets = [system_dataset(cfg, entity, s) for s in systems
               if any(s in spec.send_to for spec in ent.fields.values()) or cfg.systems[s].xid_column
               or cfg.systems[s].writes.create or cfg.systems[s].writes.archive]
    return {
        "extract": {"inputs": sources, "outputs": []},
        "load_staging": {"inputs": sources, "outputs": staging},
        "resolve_identity": {"inputs": staging, "outputs": [xref]},
        "build_golden": {"inputs": staging + [xref], "outputs": [golden, lineage]},
        "plan_changes": {"inputs": [golden, xref] + staging, "outputs": [changes]},
        "load": {"inputs": [changes], "outputs": targets},
    }
