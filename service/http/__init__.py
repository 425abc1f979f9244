"""The API process: the app factory, its route modules, auth, limits, admission, the waiter.

Never imports service.worker.
"""
