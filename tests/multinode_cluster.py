"""A real multi-node Ray cluster on this machine (head + worker nodes, all on 127.0.0.1), for tests.

Runs in its own process (so the test process's Ray, environment and temp dirs stay apart) and is
driven over stdin, one command a line, answering one JSON line each:

    python tests/multinode_cluster.py TEMP_DIR DASHBOARD_PORT
      → {"dashboard": "http://127.0.0.1:PORT", "head": NODE_ID, "workers": [NODE_ID]}
    add      → {"added": NODE_ID, "workers": [...]}      a new worker node
    remove   → {"removed": NODE_ID, "workers": [...]}    kill the oldest worker node (raylet and workers)
    quit     → {"bye": true}

Every node has the custom resource `slot: 1` (a job asking 1 slot per train worker gets one worker
per node); worker nodes also have `worker_node: 1` (to pin a worker off the head).
"""

from __future__ import annotations

import json
import os
import sys

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # nodes on 127.0.0.1
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

HEAD_CPUS = 3
WORKER_CPUS = 2


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    from ray.cluster_utils import Cluster

    temp_dir, port = os.path.join(sys.argv[1], "ray"), int(sys.argv[2])  # Ray's own layout: $RAY_TMPDIR/ray
    os.makedirs(temp_dir, exist_ok=True)
    common = {"node_ip_address": "127.0.0.1", "object_store_memory": 200 * 1024 * 1024}
    cluster = Cluster(initialize_head=True, connect=False, head_node_args={
        **common, "num_cpus": HEAD_CPUS, "resources": {"slot": 1}, "temp_dir": temp_dir,
        "include_dashboard": True, "dashboard_host": "127.0.0.1", "dashboard_port": port,
        # Not Ray's default 52365: another Ray on this machine may hold it, and then the head has no
        # job agent ("No available agent to submit job").
        "dashboard_agent_listen_port": free_port(),
    })
    workers, added = [], []

    def add():
        # Its own temp dir: nodes sharing one would share runtime_resources/, and a worker node
        # dropping a job's working_dir there would delete the head's copy under the job's driver.
        own = os.path.join(sys.argv[1], f"w{len(added)}")
        added.append(own)
        node = cluster.add_node(**common, num_cpus=WORKER_CPUS, resources={"slot": 1, "worker_node": 1},
                                temp_dir=own, include_log_monitor=True)  # its logs reach the job's driver
        workers.append(node)
        return node.node_id

    def say(**kw):
        print(json.dumps({**kw, "workers": [w.node_id for w in workers]}), flush=True)

    add()
    say(dashboard=f"http://127.0.0.1:{port}", head=cluster.head_node.node_id)
    for line in sys.stdin:
        cmd = line.strip()
        if cmd == "add":
            say(added=add())
        elif cmd == "remove":
            node = workers.pop(0)
            cluster.remove_node(node, allow_graceful=False)
            say(removed=node.node_id)
        elif cmd == "quit":
            break
        else:
            say(error=f"unknown command {cmd!r}")
    cluster.shutdown()
    say(bye=True)


if __name__ == "__main__":
    main()
