"""The job service behind the REST API, its documents, and a client for it."""
