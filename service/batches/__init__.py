"""Sample sets' domain: the sets, their files on disk, upkeep. Their routes live in service.http.

Imports neither service.http nor service.worker.
"""
