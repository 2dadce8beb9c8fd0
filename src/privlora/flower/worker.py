"""A warm launcher of ClientApps for one SuperNode started with ``--isolation process``.

By default a SuperNode starts a fresh ``flwr-clientapp`` process for every message, and each
one spends about 5 s importing torch, transformers, PEFT and Flower before it trains
(``python bench/deployment.py`` prints the cost). This worker takes the place of Flower's
SuperExec beside the SuperNode: it imports the privlora ClientApp once, asks the SuperNode's
Runtime API for tasks, and runs each one in a child forked from itself, where Flower's own
``run_clientapp`` pulls the message, calls the app, pushes the reply and exits. The child
starts with everything imported; nothing else changes (one child per message, as before, so no
state is carried from one message to the next beyond what the app itself caches on disk).

    flower-supernode ... --isolation process --host 127.0.0.1 --port 9094
    privlora flower worker --runtime-api-address 127.0.0.1:9094 --insecure

It uses Flower's Runtime API client (``flwr.supercore.runtime``), an internal API: the worker
is tested against the flwr version the project pins.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

POLL_SECONDS = 0.05  # between asks for a task: a local HTTP call, answered at once


def serve(runtime_api_address: str, insecure: bool, root_certificates: Path | None = None,
          poll: float = POLL_SECONDS) -> None:
    """Ask the SuperNode for ClientApp tasks until stopped; run each in a forked child."""
    from flwr.proto.runtime_pb2 import AcquireTaskRequest
    from flwr.supercore.constant import TaskType
    from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor
    from flwr.supercore.retry import make_simple_http_retry_invoker
    from flwr.supercore.runtime import RuntimeHttpClient

    import privlora.flower.client_app  # noqa: F401  the imports every child inherits

    certificates = None if root_certificates is None else root_certificates.read_bytes()
    client = RuntimeHttpClient.from_server_address(
        server_address=runtime_api_address, insecure=insecure, root_certificates=certificates,
        interceptors=[RuntimeVersionHttpInterceptor(component_name="SuperExec")],
        retry_invoker=make_simple_http_retry_invoker())
    ask = AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP.value])
    children: set[int] = set()
    while True:
        children = {pid for pid in children if not _exited(pid)}
        reply = client.AcquireTask(ask)
        if reply.HasField("task") and reply.token:
            children.add(_fork(runtime_api_address, reply.token, insecure, certificates))
            continue  # the SuperNode may hold another task already
        time.sleep(poll)


def _fork(address: str, token: str, insecure: bool, certificates: bytes | None) -> int:
    """Run one ClientApp task in a child process; return its PID."""
    pid = os.fork()
    if pid:
        return pid
    code = 1
    try:  # the child: Flower's ClientApp process, minus the start-up
        from flwr.supernode.runtime.run_clientapp import run_clientapp

        run_clientapp(address, token, insecure, certificates, parent_pid=os.getppid())
        code = 0
    except SystemExit as done:  # run_clientapp ends in flwr_exit (sys.exit)
        code = done.code if isinstance(done.code, int) else 1
    finally:
        os._exit(code)  # never run the parent's exit handlers, never return into its loop


def _exited(pid: int) -> bool:
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return True
    return done == pid
