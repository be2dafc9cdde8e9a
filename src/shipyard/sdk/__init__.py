"""Library for people who write services and workers on Shipyard: the bus app (shipyard.sdk.bus) and friends.

It reaches the platform only over the network (HTTP API, AMQP); it never imports the server's internals.
"""
