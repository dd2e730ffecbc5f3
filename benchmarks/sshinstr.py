"""``python -m benchmarks.sshinstr``: instructions per MiB of scp through
terminated SSH mode (``wicket proxy ssh``), in each thread of the gateway
(``--side gateway``: its two SSH legs in asyncssh and the link) or of the
cluster, counted by callgrind (``benchmarks/callgrind.py`` says how, and
how to read it).

One throwaway sshd as the node and one Wicket pair, as
``python -m benchmarks.ssh`` sets them up, with the chosen side under
``valgrind --tool=callgrind --separate-threads=yes``. After a 20 MiB
warm-up scp the counters are zeroed, one scp of ``--transactions`` MiB runs
to ``/dev/null`` on the node, and the counters are dumped: thousands of
instructions per MiB, per thread. Load-independent, unlike the MB/s of
``benchmarks.ssh``.

``--tree PATH`` runs the Wicket processes from another checkout of the
repository (an A/B of two commits with the same script).
"""

from __future__ import annotations

import os
from pathlib import Path

from benchmarks.callgrind import arguments, count
from benchmarks.ssh import Clients, start_node


def _start(work: Path, started: list, servers: list) -> tuple:
    wicket, node_port, host_key, user_key = start_node(work, started)
    clients = Clients(work, wicket, node_port, 0, host_key, user_key)
    payloads: dict[int, Path] = {}

    def scp(mib: int) -> int:
        if mib not in payloads:
            payloads[mib] = work / f"payload-{mib}.bin"
            with open(payloads[mib], "wb") as f:
                for _ in range(mib):
                    f.write(os.urandom(1 << 20))
        clients.run("scp", "terminated", str(payloads[mib]), "TARGET:/dev/null")
        return mib

    return wicket, scp, "scp through terminated mode, per MiB"


def main(argv=None) -> int:
    args = arguments("python -m benchmarks.sshinstr", __doc__, "MiB of scp", 64, argv)
    return count(args, ("ssh", "scp"), "wicket-sshinstr-", _start)


if __name__ == "__main__":
    raise SystemExit(main())
