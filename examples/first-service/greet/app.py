"""greet: greets someone, asking the names service who (client() finds its healthy instances)."""

import logging

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from shipyard.sdk import Service, client

log = logging.getLogger("greet")
names = client("names")


async def greet(request: Request) -> JSONResponse:
    name = (await names.get("/names/random")).json()["name"]
    log.info("greeting %s", name)
    return JSONResponse({"greeting": f"Hello, {name}!"})


app = Starlette(routes=[Route("/greet", greet)])
service = Service(app, name="greet")

if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # not a line per request to the server
    service.run()
