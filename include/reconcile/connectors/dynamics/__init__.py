"""Dynamics-style Dataverse Web API connector (`systems.<s>.api: dynamics`); see client.py."""
from .client import DynamicsConnector, DynamicsWriter

__all__ = ["DynamicsConnector", "DynamicsWriter"]
