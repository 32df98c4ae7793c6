"""``python http_aio_worker.py PORT``: one worker of the aiohttp app behind the script agent
(``http_apps.aiohttp_app``), on a port shared with other workers (SO_REUSEPORT); SIGTERM
stops accepting, lets requests in flight finish, then the pool drains (``on_cleanup``)."""

import sys

from aiohttp import web
from http_apps import aiohttp_app

if __name__ == "__main__":
    web.run_app(
        aiohttp_app(),
        host="127.0.0.1",
        port=int(sys.argv[1]),
        reuse_port=True,
        shutdown_timeout=10.0,
        access_log=None,
        print=None,
    )
