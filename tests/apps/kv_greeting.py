"""A worker whose greeting lives in the KV store (config/greeting/text), read through shipyard.sdk.config and kept
current by its blocking query: each change is printed, so a test (the web console's) sees a running service pick up
a KV edit in its logs."""

from __future__ import annotations

import asyncio

from shipyard.sdk import config


class Greeting(config.Settings):
    text: str = "hello"


settings = config.load(Greeting, prefix="config/greeting")


@settings.on_change
def changed(old: Greeting, new: Greeting) -> None:
    print(f"greeting is now: {new.text}", flush=True)


async def main() -> None:
    await settings.watch()
    print(f"greeting is: {settings.current.text}", flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(main())
