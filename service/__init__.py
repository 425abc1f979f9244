"""The HTTP service: FastAPI app, Redis queue, scheduler and runner, worker, metrics, settings.

May import `engines` and `model`; never `training`.
"""
