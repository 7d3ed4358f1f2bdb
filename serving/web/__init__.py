"""The web face: the app factory, the API blueprint, request parsing (written once, shared by the hit
path and Flask), rendering, errors, OpenAPI, metrics, and static/ for the page."""
