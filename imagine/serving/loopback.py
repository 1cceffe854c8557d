"""Keep a single-machine Ray (`imagine up`) on loopback: Ray's own servers are bound by `imagine.cli`, and this
worker setup hook covers Serve's one listener Ray does not let us configure.

Every Serve replica starts an inter-deployment gRPC server on `[::]:0` (hard-coded in Ray 2.60's `replica.py`),
i.e. on every interface. Clients reach it at the replica's node address, which on `imagine up` is 127.0.0.1, so
binding it there loses nothing. The hook runs in each worker process before any actor code."""

from __future__ import annotations

ANY_HOST = "[::]:"


def bind_serve_replicas_to_loopback() -> None:
    """`ray.init(runtime_env={"worker_process_setup_hook": ...})` hook: rewrite the replicas' wildcard gRPC address
    to 127.0.0.1 (the port stays whatever was asked: 0 = any free one)."""
    from ray.serve._private import replica

    bind = replica.add_port_to_grpc_server
    if getattr(bind, "imagine_loopback", False):
        return

    def add_port_on_loopback(server, address: str) -> int:  # noqa: ANN001 - a grpc.aio.Server
        if address.startswith(ANY_HOST):
            address = "127.0.0.1:" + address[len(ANY_HOST):]
        return bind(server, address)

    add_port_on_loopback.imagine_loopback = True  # type: ignore[attr-defined]
    replica.add_port_to_grpc_server = add_port_on_loopback
