"""Plugin host processes (``isolation = "process"``): the wire messages, the host, the kernel's supervisor
and the proxy that stands in for a remote plugin. Imports only ``contracts`` and ``shm``."""
