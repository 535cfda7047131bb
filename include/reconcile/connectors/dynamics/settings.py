"""Dataverse (Dynamics 365) Web API: documented limits, the defaults of `systems.<s>.limits`."""

PAGE_SIZE = 5000            # odata.maxpagesize: Dataverse returns at most 5,000 rows per page
BATCH_SIZE = 100            # keys per read of current values ($filter of `or`ed ids; keeps the URL short)
MAX_RETRIES = 8             # per call, on 429 (service protection limits), 5xx and network errors
MAX_WAIT_SECONDS = 60.0     # Retry-After of the service protection limits can be long; capped here
TIMEOUT_SECONDS = 60.0
HEADERS = {"OData-MaxVersion": "4.0", "OData-Version": "4.0"}
