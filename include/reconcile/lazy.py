"""Lazy module imports for fast start: `runner` (and through it the CLI and the DAG tasks) binds the stage
modules with `lazy_module`, so importing it loads none of pyarrow, the connectors, Splink or GX until a
stage that needs them runs (measure with `python -X importtime -c "import reconcile.cli"`)."""
from __future__ import annotations

import importlib.util
import sys
from types import ModuleType


def lazy_module(name: str) -> ModuleType:
    """The module `name`, executed on its first attribute access (importlib's LazyLoader)."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.find_spec(name)
    if spec is None or spec.loader is None:
        raise ImportError(f"no module named {name!r}")
    spec.loader = importlib.util.LazyLoader(spec.loader)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module
