"""HubSpot-style CRM objects API connector (`systems.<s>.api: hubspot`); see client.py."""
from .client import HubSpotConnector, HubSpotWriter

__all__ = ["HubSpotConnector", "HubSpotWriter"]
