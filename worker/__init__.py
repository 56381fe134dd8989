"""dpo-service's worker: a Celery app (worker.app) whose one task runs a stored job with dpo_core and
records it through the service core (service/), with pool membership and heartbeats, the lease
keeper, multi-GPU launch and Celery's process pool tuned for one job per process. Never imports api/.
"""
