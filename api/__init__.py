"""dpo-service's HTTP API: the FastAPI app (api.main.create_app), its routes, response schemas,
dependencies, input limits and error handling, the uvicorn entry (server), the dispatcher thread that
hands queued jobs to workers, and the Celery app that sends them by task name (queue). The rules,
the database and the settings it serves are the service core's (service/). Never imports torch,
transformers or worker/: jobs reach workers by task name through the broker.
"""
