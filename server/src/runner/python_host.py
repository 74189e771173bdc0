"""The host `mas run` starts for a `class_path` agent.

It does what the mas-framework runner did for one agent: imports `module:ClassName` from the
project directory, refuses anything that is not a `mas.Agent` subclass and `init_kwargs` with
reserved keys, constructs the agent with `server_addr` and `tls`, starts it, and stops it on
SIGTERM or SIGINT. Its settings come from the environment `mas run` sets (see the README).
"""

import asyncio
import importlib
import json
import os
import signal
import sys

RESERVED_KEYS = {"agent_id", "server_addr", "tls"}


def load_class(class_path, agent_base):
    module_name, sep, class_name = class_path.partition(":")
    if not sep or not module_name or not class_name:
        raise ValueError(f"Invalid class_path '{class_path}'. Use module:ClassName format.")
    target = getattr(importlib.import_module(module_name), class_name)
    if not isinstance(target, type):
        raise TypeError(f"{class_path} does not reference a class")
    if not issubclass(target, agent_base):
        raise TypeError(f"{class_path} is not a mas.Agent subclass")
    return target


async def serve(agent):
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stopping.set)
    await agent.start()
    try:
        await stopping.wait()
    finally:
        await agent.stop()


def main():
    env = os.environ
    project_dir = env["MAS_PROJECT_DIR"]
    if project_dir not in sys.path:
        sys.path.insert(0, project_dir)
    from mas import Agent
    from mas.agent import TlsClientConfig

    agent_class = load_class(env["MAS_CLASS_PATH"], Agent)
    init_kwargs = json.loads(env.get("MAS_INIT_KWARGS") or "{}")
    reserved = RESERVED_KEYS.intersection(init_kwargs)
    if reserved:
        raise ValueError("init_kwargs contains reserved keys: " + ", ".join(sorted(reserved)))
    tls = TlsClientConfig(
        root_ca_path=env["MAS_TLS_CA_PATH"],
        client_cert_path=env["MAS_TLS_CERT_PATH"],
        client_key_path=env["MAS_TLS_KEY_PATH"],
    )
    agent = agent_class(env["MAS_AGENT_ID"], server_addr=env["MAS_SERVER_ADDR"], tls=tls, **init_kwargs)
    asyncio.run(serve(agent))


if __name__ == "__main__":
    main()
