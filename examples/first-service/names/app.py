"""names: hands out a name. Any ASGI app works; Service adds /health and /metrics and serves $PORT."""

import logging
import random

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from shipyard.sdk import Service

log = logging.getLogger("names")
NAMES = ["Ada", "Grace", "Edsger", "Barbara"]


async def random_name(request: Request) -> JSONResponse:
    name = random.choice(NAMES)
    log.info("handing out %s", name)
    return JSONResponse({"name": name})


app = Starlette(routes=[Route("/names/random", random_name)])
service = Service(app, name="names")

if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # not a line per request to the server
    service.run()
