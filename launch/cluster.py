"""Local tf.distribute clusters: free ports and each worker's `TF_CONFIG`.

Library code of `launch/multiworker.py` (no flags), also used by tests.
"""

import json
import socket
from typing import List, Sequence


def free_ports(n: int) -> List[int]:
  """`n` distinct free TCP ports on localhost."""
  sockets, ports = [], []
  try:
    for _ in range(n):
      s = socket.socket()
      s.bind(("localhost", 0))
      sockets.append(s)
      ports.append(s.getsockname()[1])
  finally:
    for s in sockets:
      s.close()
  return ports


def tf_configs(ports: Sequence[int]) -> List[str]:
  """The `TF_CONFIG` of each worker of a local cluster."""
  cluster = {"worker": [f"localhost:{p}" for p in ports]}
  return [json.dumps({"cluster": cluster,
                      "task": {"type": "worker", "index": i}})
          for i in range(len(ports))]
