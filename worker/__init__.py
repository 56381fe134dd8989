"""dpo-service's worker: a Celery app whose one task runs a stored job with dpo_core and records it."""
