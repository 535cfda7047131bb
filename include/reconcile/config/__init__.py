"""Config: YAML -> typed models -> cross-field rules. `load_config(path)` is the entry point."""
from .expressions import check_expression, to_duckdb_sql
from .loader import load_config, parse_config
from .models import (CanonicalField, Config, EntityConfig, ExtractSettings, FieldMapping, SourceConfig,
                     SystemConfig, TransformStep)
from .resolve import resolve_url

__all__ = [
    "CanonicalField", "Config", "EntityConfig", "ExtractSettings", "FieldMapping", "SourceConfig",
    "SystemConfig", "TransformStep", "check_expression", "load_config", "parse_config", "resolve_url",
    "to_duckdb_sql", "json_schema",
]


def json_schema() -> dict:
    """The JSON schema of the config file, for editors (`reconcile schema`)."""
    schema = Config.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "reconcile configuration"
    return schema
