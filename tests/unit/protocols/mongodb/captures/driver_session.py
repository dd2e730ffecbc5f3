"""Drives pymongo through one session against fake_server.py (see README.md)."""
import sys, pymongo
port, comp = int(sys.argv[1]), sys.argv[2]
kw = {"compressors": "zlib"} if comp == "zlib" else {}
c = pymongo.MongoClient(f"mongodb://127.0.0.1:{port}/?directConnection=true", serverSelectionTimeoutMS=3000, heartbeatFrequencyMS=60000, **kw)
db = c.app
db.users.find_one({"age": {"$gt": 30}, "name": "bob"})
db.users.insert_many([{"_id": i, "secret": "s" * 20} for i in range(3)])
db.users.update_one({"name": "bob"}, {"$set": {"age": 41}})
db.users.delete_many({"age": {"$lt": 18}})
list(db.orders.aggregate([{"$match": {"status": "A"}}, {"$merge": {"into": {"db": "reports", "coll": "daily"}}}]))
db.users.with_options(write_concern=pymongo.WriteConcern(w=0)).insert_one({"x": 1})
c.close()
