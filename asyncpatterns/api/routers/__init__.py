"""One ``APIRouter`` per resource: ``users``, ``teams``, ``accounts`` (with transfers).

``create_app`` includes them in that order; within a router, routes match in
the order they are declared.
"""
