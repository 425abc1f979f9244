"""The `ldit` command line: a client of the service's HTTP API (imports nothing of the service)."""
