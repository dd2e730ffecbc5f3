"""MongoDB's wire protocol, sans-I/O: BSON, wire messages, commands, audit."""
