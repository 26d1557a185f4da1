"""A multi-node Ray cluster on this machine for tests/test_cluster.py, in its own process (Ray reads its auth
settings once per process): Ray's own test cluster (ray.cluster_utils), a head and one more node of 1 CPU each.

    python -m tests.ray_cluster [--dashboard-port P --agent-port Q]
                        # prints the GCS address and the head's temp dir, then reads commands on stdin, one a line:
        kill   the newest non-head node dies: kill -9 of its raylet, agents and workers
        add    a new 1-CPU node joins
        stop   shut the cluster down and exit
Each command is answered with `ok` once done. With --dashboard-port the head runs Ray's dashboard on
127.0.0.1:P and its job agent on Q (Ray's fixed default, 52365, may be held by another test's Ray): `ray job submit`
then works against http://127.0.0.1:P.
"""

import argparse
import shutil
import sys
import tempfile

from ray.cluster_utils import Cluster


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dashboard-port", type=int, default=None)
    ap.add_argument("--agent-port", type=int, default=None)
    args = ap.parse_args()
    head_dir = tempfile.mkdtemp(prefix="rh", dir="/tmp")  # short: socket paths must stay < 108 chars
    head = {"num_cpus": 1, "include_dashboard": False, "temp_dir": head_dir}
    if args.dashboard_port:
        head.update(include_dashboard=True, dashboard_host="127.0.0.1", dashboard_port=args.dashboard_port,
                    dashboard_agent_listen_port=args.agent_port)
    cluster = Cluster(initialize_head=True, head_node_args=head)
    temp_dirs: list[str] = [head_dir]
    mark_current(head_dir, cluster.address)

    def add_node():
        # a temp dir of its own, as another machine has: nodes sharing the head's session folder also share its
        # runtime_resources, and a new node's runtime-env agent deleted the job's unpacked working dir there
        # (and a log monitor of its own, which Ray's test cluster leaves to the head's: else the prints of a worker
        # on this node never reach the driver)
        temp_dirs.append(tempfile.mkdtemp(prefix="rn", dir="/tmp"))  # short: socket paths must stay < 108 chars
        mark_current(temp_dirs[-1], cluster.address)
        return cluster.add_node(num_cpus=1, temp_dir=temp_dirs[-1], include_log_monitor=True)

    nodes = [add_node()]
    print(cluster.address, head_dir, flush=True)
    try:
        for line in sys.stdin:
            cmd = line.strip()
            if cmd == "kill":
                kill_node(cluster, nodes.pop())
            elif cmd == "add":
                nodes.append(add_node())
            elif cmd == "stop":
                break
            print("ok", flush=True)
    finally:
        cluster.shutdown()
        for d in temp_dirs:
            shutil.rmtree(d, ignore_errors=True)


def mark_current(temp_dir: str, address: str) -> None:
    """Write `temp_dir`/ray_current_cluster as `ray start` does (Ray's test cluster does not). A `ray job submit`
    job's driver is given the address its supervisor finds for "auto" from there; with no such file Ray took any GCS
    running on this machine, which was another test's (or a `dvc repro`'s) local Ray whenever one ran beside this
    cluster: its driver then failed to join with InvalidAuthToken (that other cluster's token)."""
    with open(f"{temp_dir}/ray_current_cluster", "w") as f:
        f.write(address)


def kill_node(cluster: Cluster, node) -> None:
    """kill -9 of a node's raylet, its agents and its workers, as when the machine is lost. Ray's remove_node
    kills only the processes it started; a worker (a child of the raylet) lived on and finished the run."""
    import psutil

    procs = []
    for infos in node.all_processes.values():
        for info in infos:
            try:
                root = psutil.Process(info.process.pid)
                procs += [root, *root.children(recursive=True)]
            except psutil.NoSuchProcess:
                pass
    for proc in procs:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    cluster.remove_node(node, allow_graceful=False)


if __name__ == "__main__":
    main()
