"""Request (…Create) and response (…Public) schemas, one module per resource."""
