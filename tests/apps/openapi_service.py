"""A small HTTP API that publishes its own OpenAPI document: `python openapi_service.py PORT NAME`.

For gateway docs tests: `GET /openapi.json` describes `GET /items`, `GET /items/{id}` and `POST /items` (with an
`Item` schema whose description names the service, so two services' `Item`s differ; `ItemList`, written alike in
every service but made of its `Item`; `HTTPValidationError` and `ValidationError` exactly as FastAPI writes them in
every service), and those operations really answer, with NAME in them.
"""

from __future__ import annotations

import sys

from aiohttp import web

PORT = int(sys.argv[1])
NAME = sys.argv[2]


def openapi() -> dict:
    item_ref = {"$ref": "#/components/schemas/Item"}
    return {
        "openapi": "3.0.3",
        "info": {"title": f"{NAME} API", "version": "1.0"},
        "paths": {
            "/items": {
                "get": {"operationId": "list_items", "summary": f"List {NAME} items",
                        "responses": {"200": {"description": "items", "content": {"application/json": {
                            "schema": {"$ref": "#/components/schemas/ItemList"}}}}}},
                "post": {"operationId": "create_item", "requestBody": {"content": {"application/json": {
                    "schema": item_ref}}}, "responses": {"201": {"description": "created"}, "422": {
                        "description": "Validation Error", "content": {"application/json": {
                            "schema": {"$ref": "#/components/schemas/HTTPValidationError"}}}}}},
            },
            "/items/{id}": {
                "get": {"operationId": "get_item", "parameters": [
                    {"name": "id", "in": "path", "required": True, "schema": {"type": "integer"}}],
                    "responses": {"200": {"description": "one item", "content": {"application/json": {
                        "schema": item_ref}}}}},
            },
        },
        "components": {"schemas": {
            "Item": {"type": "object", "description": f"An item of {NAME}", "properties": {
                "id": {"type": "integer"}, "service": {"type": "string"}}},
            "ItemList": {"type": "array", "items": item_ref},
            "HTTPValidationError": {"title": "HTTPValidationError", "type": "object", "properties": {"detail": {
                "title": "Detail", "type": "array", "items": {"$ref": "#/components/schemas/ValidationError"}}}},
            "ValidationError": {"title": "ValidationError", "required": ["loc", "msg", "type"], "type": "object",
                                "properties": {"loc": {"title": "Location", "type": "array", "items": {
                                    "anyOf": [{"type": "string"}, {"type": "integer"}]}},
                                    "msg": {"title": "Message", "type": "string"},
                                    "type": {"title": "Error Type", "type": "string"}}},
        }},
    }


async def list_items(request: web.Request) -> web.Response:
    return web.json_response([{"id": 1, "service": NAME}])


async def get_item(request: web.Request) -> web.Response:
    return web.json_response({"id": int(request.match_info["id"]), "service": NAME})


async def create_item(request: web.Request) -> web.Response:
    return web.json_response({**await request.json(), "service": NAME}, status=201)


async def spec(request: web.Request) -> web.Response:
    return web.json_response(openapi())


def main() -> None:
    app = web.Application()
    app.router.add_get("/openapi.json", spec)
    app.router.add_get("/items", list_items)
    app.router.add_post("/items", create_item)
    app.router.add_get("/items/{id}", get_item)
    app.router.add_get("/health", lambda _: web.Response(text="ok"))
    web.run_app(app, host="127.0.0.1", port=PORT, print=None, access_log=None)


if __name__ == "__main__":
    main()
