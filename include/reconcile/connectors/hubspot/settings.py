"""HubSpot CRM v3 objects API: the vendor's documented limits, the defaults of `systems.<s>.limits`."""

PAGE_SIZE = 100              # GET /crm/v3/objects/{type}: at most 100 per page
SEARCH_PAGE_SIZE = 200       # POST .../search: at most 200 per page
SEARCH_MAX_RESULTS = 10_000  # a search cannot page beyond 10,000 results: re-window by the modified property
BATCH_SIZE = 100             # batch read / create / update / archive: at most 100 inputs
MAX_RETRIES = 8              # per call, on 429, 5xx and network errors
MAX_WAIT_SECONDS = 30.0      # longest single back-off
TIMEOUT_SECONDS = 60.0

OBJECTS_PATH = "/crm/v3/objects"
PROPERTIES_PATH = "/crm/v3/properties"
ID_PROPERTY = "hs_object_id"  # the object id as a property (read-only)
