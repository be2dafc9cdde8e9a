"""Task drivers: how an instance becomes processes on this node (exec today; docker later).

A driver runs what it is given; it must never decide what should run or where.
"""
