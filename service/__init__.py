"""dpo-service's core, shared by the HTTP API (api/) and the workers (worker/): the settings, the domain
errors, the database (db/: models, engine, migrations at start-up, and the reads and writes of jobs,
teams, workers, leases, usage and quotas), the rules that schedule and repair jobs (scheduler,
reconciler, queue_info), the job request and how it becomes a TrainingSpec (requests, jobspec,
model_paths), artifact storage (artifacts), API keys (auth), the queue contract (broker), and the
`dpo-service` command that starts the processes by module name (cli, admin_cli, demo). It imports
neither api/ nor worker/, nor FastAPI, Celery or torch (tests/service/test_import_boundaries.py).
"""
