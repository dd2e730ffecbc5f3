"""SSH, sans-I/O: what Wicket itself reads of SSH.

Wicket does not implement SSH (asyncssh and OpenSSH do): it reads only

* the plaintext start of the SSH transport (RFC 4253: the version
  exchange and the key exchange up to NEWKEYS), where the node's host key
  travels in the clear, so the cluster can refuse a node whose key is not
  the registered one (:mod:`protocols.ssh.transport`);
* its own hand-off frame, in which the cluster gives the gateway the user
  certificate and the node's known_hosts lines for one terminated session
  (:mod:`protocols.ssh.handoff`).
"""

from protocols.ssh.handoff import Handoff, HandoffReader, encode_handoff
from protocols.ssh.transport import HostKeySeen, KexWatcher

__all__ = ["Handoff", "HandoffReader", "encode_handoff", "HostKeySeen", "KexWatcher"]
