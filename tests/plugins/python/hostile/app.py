"""A hostile Python plugin, for the sandbox tests: `config.do` says how it misbehaves.

raise    raises ValueError (the error must show the Python exception)
loop     never returns (the deadline must stop it)
alloc    allocates without bound (the memory cap must stop it)
open     opens a file of the host (there are none to open)
socket   connects to the network (there is none)
environ  reads the environment (it is empty)
clock    reads the clock (it reads zero)
"""

import os
import time

import ladle_plugin


@ladle_plugin.filter
def misbehave(record, config):
    do = config.get("do")
    if do == "raise":
        raise ValueError(f"bad caption in record {record.get('id')}")
    if do == "loop":
        while True:
            pass
    if do == "alloc":
        hoard = []
        while True:
            hoard.append(bytearray(1 << 20))
    if do == "open":
        with open("/etc/passwd") as f:
            return {"id": record.get("id"), "stolen": f.read()}
    if do == "socket":
        import socket

        socket.create_connection(("127.0.0.1", 22), timeout=1)
        return {"id": record.get("id"), "connected": True}
    if do == "environ":
        return {"id": record.get("id"), "environ": dict(os.environ)}
    if do == "clock":
        return {"id": record.get("id"), "time": time.time()}
    return True


Filter = ladle_plugin.Filter
