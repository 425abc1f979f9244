"""Redis state both processes share: job keys, Lua scripts, pub/sub, connections, heartbeats,
progress events, capacity estimates, the embedded Redis.

Imports neither service.http, service.worker nor service.batches.
"""
