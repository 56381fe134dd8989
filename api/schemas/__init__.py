"""Request (…Create) and response (…Public) schemas, one module per resource; the job request
(JobCreate) is service.requests', since the service core builds the job from it."""
