"""The API gateway: data plane worker processes, the route table, balancers, and plugins.

Workers read the store only through the server's HTTP API (RemoteStore); they never open its files.
"""
