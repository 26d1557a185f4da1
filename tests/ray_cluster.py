"""A multi-node Ray cluster on this machine for tests/test_cluster.py, in its own process (Ray reads its auth
settings once per process): Ray's own test cluster (ray.cluster_utils), a head and one more node of 1 CPU each.

    python -m tests.ray_cluster      # prints the GCS address, then reads commands on stdin, one a line:
        kill   the newest non-head node dies (its raylet and workers, no graceful stop)
        add    a new 1-CPU node joins
        stop   shut the cluster down and exit
Each command is answered with `ok` once done.
"""

import sys

from ray.cluster_utils import Cluster


def main() -> None:
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    nodes = [cluster.add_node(num_cpus=1)]
    print(cluster.address, flush=True)
    try:
        for line in sys.stdin:
            cmd = line.strip()
            if cmd == "kill":
                cluster.remove_node(nodes.pop(), allow_graceful=False)
            elif cmd == "add":
                nodes.append(cluster.add_node(num_cpus=1))
            elif cmd == "stop":
                break
            print("ok", flush=True)
    finally:
        cluster.shutdown()


if __name__ == "__main__":
    main()
