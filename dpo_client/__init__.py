"""dpo_client: `dpo`, the command-line client of dpo-service.

It talks to the REST API only (httpx), so it runs on any machine that reaches the service, and it never
imports torch nor the service's own packages (tests/service/test_import_boundaries.py checks it); a
`--config` YAML is read with dpo_core.spec's reader, the same one `dpo-train` uses.
"""
