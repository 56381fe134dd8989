"""dpo-service's API side: the FastAPI app (api.main), its settings, the job store and artifact storage.

Never imports torch, transformers or worker/: jobs reach workers by task name through the broker.
The worker imports `api.settings`, `api.store` and `api.queue` (all free of FastAPI) to share them.
"""
