"""The worker process: the step loop, scheduler and runner, intake, results, heartbeat.

Never imports service.http.
"""
