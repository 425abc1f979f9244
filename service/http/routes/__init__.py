"""The API's routes, one module per resource; each exposes `add_*_routes(app, ...)`.
"""
