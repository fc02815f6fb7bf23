"""The HTTP API: routes, the envelope, auth and path rules (SPEC §4 and §5)."""
