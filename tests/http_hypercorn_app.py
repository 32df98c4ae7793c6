"""``hypercorn http_hypercorn_app:app``: the echo app behind the script agent (no factories)."""

from http_apps import asgi

app = asgi()
