"""What a MongoDB command is about, for access checks and the audit; and the
error replies the gateway and the cluster answer with.

Spec: mongodb/specifications ``source/message/OP_MSG.md`` ("Global Command
Arguments": ``$db``; "Command Arguments As Payload": ``documents``,
``updates``, ``deletes``); the server manual's command pages (find,
aggregate with ``$out``/``$merge``, getMore, killCursors, explain,
renameCollection); ``source/mongodb-handshake/handshake.md`` (legacy hello
is an OP_QUERY on ``admin.$cmd``).

Theory of operation
-------------------
:func:`view` reads a command body (the first key names the command; its
value is usually the collection) and the counts of its document sequences,
and returns a :class:`Command`: name, ``$db``, collection, every other
namespace it reads from or writes to (``$out``/``$merge`` targets,
``$lookup`` from another database, ``renameCollection``'s two, a
``bulkWrite``'s ``nsInfo``, a ``mapReduce``'s ``out``), and for the
audit the *shape* of its filters: keys and operators kept, every value
replaced by its BSON type name (``{"age": {"$gt": "int32"}}``), never a
value. :attr:`Command.databases` is every database it touches, what a role
is checked against. Shapes are bounded (depth, keys, filters), so an
adversarial filter costs a bounded record.

The reply helpers build ``{ok: 0, errmsg, code, codeName}``, as an OP_MSG
or, for a legacy OP_QUERY hello, an OP_REPLY; drivers raise them as their
own exceptions.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Final

import attrs

from protocols.errors import ErrorCode, RemoteProtocolError
from protocols.mongodb import bson
from protocols.mongodb.wire import OpMsg, OpQuery, OpReply

__all__ = [
    "ERROR_CODES", "AUTH_COMMANDS", "HANDSHAKE_COMMANDS", "MAX_SHAPE_DEPTH", "MAX_SHAPE_KEYS",
    "MAX_FILTERS", "READ_FIELDS", "COUNTED_FIELDS", "Namespace", "Command", "shape", "view", "view_message", "error_document",
    "error_reply", "error_code_for", "reply_to",
]

#: MongoDB error codes the gateway and the cluster answer with, by codeName
#: (src/mongo/base/error_codes.yml).
ERROR_CODES: Final[Mapping[str, int]] = {
    "BadValue": 2, "HostUnreachable": 6, "HostNotFound": 7, "FailedToParse": 9,
    "UserNotFound": 11, "Unauthorized": 13, "ProtocolError": 17, "AuthenticationFailed": 18,
    "IllegalOperation": 20, "InvalidBSON": 22, "CommandNotFound": 59, "NetworkTimeout": 89,
    "ShutdownInProgress": 91, "CommandNotSupported": 115, "SSLHandshakeFailed": 141, "ZLibError": 147,
    "IllegalOpMsgFlag": 223, "ChecksumMismatch": 288, "MechanismUnavailable": 334,
    "UnsupportedOpQueryCommand": 352, "ReauthenticationRequired": 391,
}
_NAMES_BY_CODE: Final = {code: name for name, code in ERROR_CODES.items()}

#: Commands that log in or say hello (never audited for their payloads).
HANDSHAKE_COMMANDS: Final = frozenset({"hello", "isMaster", "ismaster"})
AUTH_COMMANDS: Final = HANDSHAKE_COMMANDS | frozenset(
    {"saslStart", "saslContinue", "authenticate", "logout", "getnonce", "speculativeAuthenticate"})

#: What a document is: a dict first (every decoded one; a C-level check),
#: then any Mapping (an ABC check, slower, for callers' own).
_MAPPING: Final = (dict, Mapping)
MAX_SHAPE_DEPTH: Final = 8
MAX_SHAPE_KEYS: Final = 32
MAX_FILTERS: Final = 16
_TRUNCATED: Final = "..."

# Commands whose first value is a collection name in $db.
_ON_A_COLLECTION: Final = frozenset({
    "find", "aggregate", "count", "distinct", "insert", "update", "delete", "findAndModify",
    "findandmodify", "create", "drop", "createIndexes", "dropIndexes", "deleteIndexes",
    "listIndexes", "collMod", "mapReduce", "mapreduce", "validate", "collStats", "compact",
    "killCursors", "createSearchIndexes", "dropSearchIndex", "updateSearchIndex",
    "listSearchIndexes", "analyzeShardKey", "bulkWrite",
})
# Where each command keeps the filters an audit shows: (field, is a list of
# statements whose "q" is the filter).
_FILTERS: Final[Mapping[str, tuple[str, bool]]] = {
    "find": ("filter", False), "count": ("query", False), "distinct": ("query", False),
    "findAndModify": ("query", False), "findandmodify": ("query", False),
    "update": ("updates", True), "delete": ("deletes", True), "mapReduce": ("query", False),
}
# The document sequence (or body array) whose length counts a write.
_WRITES: Final = {"insert": "documents", "update": "updates", "delete": "deletes"}
#: The body fields :func:`view` reads (besides the first, the command's own):
#: a reader may leave every other one undecoded (bson.decode_fields), and
#: need only count those of :data:`COUNTED_FIELDS`.
READ_FIELDS: Final = frozenset({
    "$db", "lsid", "collection", "pipeline", "to", "nsInfo", "out", "mechanism",
    *(field for field, _ in _FILTERS.values()),
})
COUNTED_FIELDS: Final = frozenset({"documents", "ops"})


@attrs.frozen
class Namespace:
    database: str
    collection: str | None = None

    def __str__(self) -> str:
        return self.database if self.collection is None else f"{self.database}.{self.collection}"


@attrs.frozen(kw_only=True)
class Command:
    """What one command is about; see the module docstring."""

    name: str
    #: ``$db`` (OP_MSG) or the database of a legacy ``db.$cmd``.
    database: str
    collection: str | None = None
    #: Filter shapes, at most MAX_FILTERS (``filters_truncated`` then says so).
    filters: tuple[Any, ...] = attrs.field(default=(), converter=tuple, hash=False)
    filters_truncated: bool = False
    #: Aggregation stage names, in order (top level).
    pipeline: tuple[str, ...] = ()
    writes_to: tuple[Namespace, ...] = ()
    reads_from: tuple[Namespace, ...] = ()
    #: Documents inserted, or update/delete statements.
    documents: int | None = None
    #: saslStart's mechanism; never a payload.
    mechanism: str | None = None
    #: The command came in a legacy OP_QUERY.
    legacy: bool = False
    #: The logical session's id (``lsid.id``, a UUID's 16 bytes), if sent:
    #: what ``killSessions`` names when the session is cut.
    lsid: bytes | None = None
    #: ``getMore``'s cursor id: a cursor the session holds open.
    cursor_id: int | None = None

    @property
    def is_auth(self) -> bool:
        return self.name in AUTH_COMMANDS

    @property
    def databases(self) -> frozenset[str]:
        """Every database the command touches: what a role must allow."""
        return frozenset({self.database} | {ns.database for ns in self.writes_to}
                         | {ns.database for ns in self.reads_from})


def _bad(message: str) -> RemoteProtocolError:
    return RemoteProtocolError(message, code=ErrorCode.BAD_REQUEST,
                               wire_hint=ERROR_CODES["FailedToParse"])


# --- shapes -----------------------------------------------------------------------------


def shape(value: Any, depth: int = 0) -> Any:
    """``value`` with every leaf replaced by its BSON type name; documents
    keep their keys (field names and operators), arrays their elements'
    shapes. Cut at MAX_SHAPE_DEPTH levels and MAX_SHAPE_KEYS entries per
    level, the cut marked with "..."."""
    if isinstance(value, _MAPPING):
        if depth >= MAX_SHAPE_DEPTH:
            return _TRUNCATED
        out: dict[str, Any] = {}
        for i, (key, item) in enumerate(value.items()):
            if i == MAX_SHAPE_KEYS:
                out[_TRUNCATED] = _TRUNCATED
                break
            out[key] = shape(item, depth + 1)
        return out
    if isinstance(value, list):
        if depth >= MAX_SHAPE_DEPTH:
            return _TRUNCATED
        items = [shape(item, depth + 1) for item in value[:MAX_SHAPE_KEYS]]
        return items + [_TRUNCATED] if len(value) > MAX_SHAPE_KEYS else items
    return bson.type_name(value)


# --- the view ----------------------------------------------------------------------------


def _text(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise _bad(f"{what} must be a string, not {bson.type_name(value)}")
    return value


class _Pipeline:
    """Stage names and the namespaces of an aggregation pipeline."""

    def __init__(self, database: str) -> None:
        self.database = database
        self.stages: list[str] = []
        self.matches: list[Any] = []
        self.writes: list[Namespace] = []
        self.reads: list[Namespace] = []

    def walk(self, pipeline: Any, depth: int = 0) -> None:
        if not isinstance(pipeline, list):
            raise _bad("an aggregation pipeline must be an array")
        if depth > MAX_SHAPE_DEPTH:
            raise _bad("aggregation pipelines are nested too deep to audit")
        for stage in pipeline:
            if not isinstance(stage, _MAPPING) or len(stage) != 1:
                raise _bad("a pipeline stage must be a document with one field")
            ((name, spec),) = stage.items()
            if depth == 0:
                self.stages.append(name)
            if name == "$match":
                self.matches.append(spec)
            elif name == "$out":
                self.writes.append(self._target(spec, "coll"))
            elif name == "$merge":
                into = spec.get("into") if isinstance(spec, _MAPPING) else spec
                self.writes.append(self._target(into, "coll"))
            elif name in ("$lookup", "$graphLookup", "$unionWith"):
                self._joined(name, spec, depth)
            elif name == "$facet" and isinstance(spec, _MAPPING):
                for sub in spec.values():
                    self.walk(sub, depth + 1)

    def _joined(self, name: str, spec: Any, depth: int) -> None:
        if isinstance(spec, str) and name == "$unionWith":  # {$unionWith: "coll"}
            self.reads.append(Namespace(self.database, spec))
            return
        if not isinstance(spec, _MAPPING):
            raise _bad(f"{name} takes a document")
        source = spec.get("from", spec.get("coll"))
        if source is not None:
            self.reads.append(self._target(source, "coll"))
        if "pipeline" in spec:
            self.walk(spec["pipeline"], depth + 1)

    def _target(self, spec: Any, key: str) -> Namespace:
        """A stage's collection: a name in this database, or {db, coll}."""
        if isinstance(spec, str):
            return Namespace(self.database, spec)
        if isinstance(spec, _MAPPING):
            database = _text(spec.get("db", self.database), "a stage's db")
            return Namespace(database, _text(spec.get(key), "a stage's collection"))
        raise _bad("a stage's target must be a collection name or {db, coll}")


def _namespace(full: str) -> Namespace:
    """``db.collection`` (a collection name may hold dots; a database never)."""
    database, _, collection = full.partition(".")
    return Namespace(database, collection or None)


def _documents(value: Any) -> list[Any]:
    return list(value) if isinstance(value, (list, tuple)) else []


def _statement_filters(statements: Iterable[Any]) -> list[Any]:
    return [s.get("q") for s in statements if isinstance(s, _MAPPING) and "q" in s]


def view(body: Mapping[str, Any], sequences: Mapping[str, Any] | None = None, *,
         database: str | None = None, legacy: bool = False) -> Command:
    """The :class:`Command` a command body holds. ``sequences`` maps an
    OP_MSG's document-sequence identifiers to their documents (or just their
    counts); ``database`` stands in for ``$db`` (a legacy ``db.$cmd``).
    RemoteProtocolError (FailedToParse, 9) for a body no server would run:
    empty, without a string ``$db``, a pipeline that is not one."""
    if not body:
        raise _bad("a command body is empty")
    name = next(iter(body))
    if database is None:
        database = _text(body.get("$db"), "$db") if "$db" in body else None
        if database is None:
            raise _bad(f"the command {name[:64]!r} has no $db")
    if name == "explain" and isinstance(body[name], _MAPPING) and body[name]:
        inner = view({**body[name], "$db": database}, sequences, legacy=legacy)
        return attrs.evolve(inner, name="explain")
    sequences = sequences or {}
    value = body[name]
    collection = value if name in _ON_A_COLLECTION and isinstance(value, str) else None
    if name == "getMore":
        collection = body.get("collection") if isinstance(body.get("collection"), str) else None
    filters: list[Any] = []
    writes: list[Namespace] = []
    reads: list[Namespace] = []
    stages: tuple[str, ...] = ()
    documents = None
    if name == "aggregate":
        pipeline = _Pipeline(database)
        pipeline.walk(body.get("pipeline", []))
        stages, filters = tuple(pipeline.stages), pipeline.matches
        writes, reads = pipeline.writes, pipeline.reads
    elif name in _FILTERS:
        field, statements = _FILTERS[name]
        found = sequences.get(field, body.get(field)) if statements else body.get(field)
        if statements and isinstance(found, list):
            filters = _statement_filters(found)
        elif isinstance(found, _MAPPING):
            filters = [found]
    if name in _WRITES:
        field = _WRITES[name]
        found = sequences.get(field, body.get(field))
        documents = found if isinstance(found, int) else len(found) if isinstance(
            found, list | tuple) else None
    if name == "renameCollection":
        for key, target in (("renameCollection", reads), ("to", writes)):
            full = body.get(key)
            if isinstance(full, str):
                target.append(_namespace(full))
    elif name == "bulkWrite":
        # MongoDB 8.0: one command writes to any collection of any database
        # its nsInfo names; ops counts the writes.
        for info in _documents(sequences.get("nsInfo", body.get("nsInfo"))):
            if isinstance(info, _MAPPING) and isinstance(info.get("ns"), str):
                writes.append(_namespace(info["ns"]))
        ops = sequences.get("ops", body.get("ops"))
        documents = ops if isinstance(ops, int) else len(_documents(ops))
    elif name in ("mapReduce", "mapreduce"):
        out = body.get("out")
        if isinstance(out, str):
            writes.append(Namespace(database, out))
        elif isinstance(out, _MAPPING) and "inline" not in out:
            target = next((v for k, v in out.items() if k in ("replace", "merge", "reduce")),
                          None)
            writes.append(Namespace(_text(out.get("db", database), "mapReduce's out.db"),
                                    target if isinstance(target, str) else None))
    mechanism = body.get("mechanism") if name == "saslStart" else None
    lsid = body.get("lsid")
    lsid = lsid.get("id") if isinstance(lsid, _MAPPING) else None
    cursor_id = value if name == "getMore" and isinstance(value, int) and not isinstance(value, bool) else None
    return Command(name=name, database=database, collection=collection,
                   filters=[shape(f) for f in filters[:MAX_FILTERS]],
                   filters_truncated=len(filters) > MAX_FILTERS, pipeline=stages,
                   writes_to=tuple(writes), reads_from=tuple(reads), documents=documents,
                   mechanism=mechanism if isinstance(mechanism, str) else None, legacy=legacy,
                   lsid=lsid.data if isinstance(lsid, bson.Binary) and lsid.subtype == 4 and len(lsid.data) == 16
                   else None, cursor_id=cursor_id)


def view_message(message: OpMsg | OpQuery) -> Command:
    """The command an OP_MSG carries, or a legacy OP_QUERY on ``db.$cmd``.
    An OP_QUERY on a collection (a legacy find, removed from servers) is
    RemoteProtocolError with UnsupportedOpQueryCommand (352)."""
    if isinstance(message, OpMsg):
        return view(message.body, {s.identifier: list(s.documents) for s in message.sequences})
    database, _, collection = message.collection.partition(".")
    if collection != "$cmd" or not database:
        raise RemoteProtocolError(
            f"OP_QUERY on {message.collection[:128]!r}: only commands on <db>.$cmd are "
            f"supported in OP_QUERY", code=ErrorCode.BAD_REQUEST,
            wire_hint=ERROR_CODES["UnsupportedOpQueryCommand"])
    query = message.query
    if "$query" in query and isinstance(query["$query"], _MAPPING):
        query = query["$query"]  # the legacy wrapper around a read preference
    return view(query, database=database, legacy=True)


# --- error replies ----------------------------------------------------------------------------


_BY_ERROR_CODE: Final = {
    ErrorCode.ACCESS_DENIED: "Unauthorized", ErrorCode.RESOURCE_NOT_FOUND: "Unauthorized",
    ErrorCode.CERT_EXPIRED: "ReauthenticationRequired",
    ErrorCode.CERT_INVALID: "AuthenticationFailed",
    ErrorCode.CERT_REQUIRED: "AuthenticationFailed", ErrorCode.USER_LOCKED: "AuthenticationFailed",
    ErrorCode.UPSTREAM_UNREACHABLE: "HostUnreachable", ErrorCode.BAD_REQUEST: "ProtocolError",
    ErrorCode.UNSUPPORTED_VERSION: "CommandNotSupported", ErrorCode.RATE_LIMITED: "Unauthorized",
    ErrorCode.INTERNAL_ERROR: "HostUnreachable",
}


def error_code_for(code: ErrorCode) -> int:
    """The MongoDB code a dial refusal becomes for a driver."""
    return ERROR_CODES[_BY_ERROR_CODE[code]]


def error_document(errmsg: str, code: int | str) -> dict[str, Any]:
    """``{ok: 0.0, errmsg, code, codeName}``; ``code`` by number or codeName."""
    if isinstance(code, str):
        name, number = code, ERROR_CODES[code]
    else:
        number, name = code, _NAMES_BY_CODE.get(code, "UnknownError")
    return {"ok": 0.0, "errmsg": errmsg, "code": number, "codeName": name}


def reply_to(request: OpMsg | OpQuery, body: Mapping[str, Any], *,
             request_id: int = 0) -> OpMsg | OpReply:
    """``body`` as the reply to ``request``, in its own kind: an OP_MSG
    answers an OP_MSG, an OP_REPLY a legacy OP_QUERY (whose command reply is
    one document, with ok: 0 for an error, not QueryFailure)."""
    if isinstance(request, OpQuery):
        return OpReply(request_id=request_id, response_to=request.request_id, documents=[body])
    return OpMsg(request_id=request_id, response_to=request.request_id, body=body)


def error_reply(request: OpMsg | OpQuery, errmsg: str, code: int | str, *,
                request_id: int = 0) -> OpMsg | OpReply:
    """The error reply to ``request`` (see :func:`reply_to`)."""
    return reply_to(request, error_document(errmsg, code), request_id=request_id)
