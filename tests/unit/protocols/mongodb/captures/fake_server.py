"""A fake MongoDB server (see README.md) that answers just enough for pymongo, recording
everything each connection sends (hex, one JSON line per connection)."""
import json, socket, sys, threading
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[5]))
from protocols.mongodb import bson, wire
from protocols.signals import NEED_DATA

port, out_path, compress = int(sys.argv[1]), sys.argv[2], sys.argv[3] == "zlib"
lock = threading.Lock()
out = open(out_path, "w")
HELLO = {"ismaster": True, "isWritablePrimary": True, "helloOk": True, "maxWireVersion": 21,
         "minWireVersion": 0, "maxBsonObjectSize": 16777216, "maxMessageSizeBytes": 48000000,
         "maxWriteBatchSize": 100000, "localTime": bson.DateTime(1765000000000),
         "logicalSessionTimeoutMinutes": 30, "connectionId": 1, "readOnly": False, "ok": 1.0}
if compress:
    HELLO["compression"] = ["zlib"]

def answer(body):
    name = next(iter(body))
    if name in ("hello", "isMaster", "ismaster"):
        return HELLO
    if name in ("find", "aggregate"):
        return {"cursor": {"firstBatch": [{"_id": 1, "age": 40}], "id": bson.Int64(0),
                           "ns": f"{body['$db']}.{body[name]}"}, "ok": 1.0}
    if name in ("insert", "update", "delete"):
        return {"n": 1, "ok": 1.0}
    if name == "saslStart":
        return {"ok": 0.0, "errmsg": "Authentication failed.", "code": 18, "codeName": "AuthenticationFailed"}
    return {"ok": 1.0}

def serve(conn, index):
    reader = wire.MessageReader()
    rid = 1000 * index
    stream = bytearray()
    while True:
        data = conn.recv(65536)
        if not data:
            with lock:
                out.write(json.dumps({"conn": index, "stream": stream.hex()}) + "\n"); out.flush()
            return
        stream += data
        reader.receive_data(data)
        while (m := reader.next_event()) is not NEED_DATA:
            inner = wire.decompress(m) if isinstance(m, wire.OpCompressed) else m
            rid += 1
            if isinstance(inner, wire.OpQuery):
                reply = wire.OpReply(request_id=rid, response_to=inner.request_id, documents=[answer(inner.query)])
            else:
                if inner.more_to_come:
                    continue
                reply = wire.OpMsg(request_id=rid, response_to=inner.request_id, body=answer(inner.body))
            if isinstance(m, wire.OpCompressed):
                reply = wire.compress(reply)
            conn.sendall(reply.encode())

srv = socket.socket(); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("127.0.0.1", port)); srv.listen(); srv.settimeout(15)
i = 0
try:
    while True:
        c, _ = srv.accept(); i += 1
        threading.Thread(target=serve, args=(c, i), daemon=True).start()
except socket.timeout:
    pass
