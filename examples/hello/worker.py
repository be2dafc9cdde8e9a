"""The demo's background worker: takes greeting tasks from the bus and prints them (see `shipyard logs`).

Run by the platform as `shipyard worker worker:bus`; it knows the bus from SHIPYARD_BUS_URL.
"""

from __future__ import annotations

from shipyard.sdk.bus import BusApp

bus = BusApp()


@bus.task("greetings")
async def greet(payload: dict, message) -> None:  # type: ignore[no-untyped-def]
    print(f"greeted {payload['name']} (attempt {message.attempts})", flush=True)
