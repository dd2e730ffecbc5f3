-- benchmarks/sysbench.py's "connect" workload: every event is a new
-- connection that runs `select 1` and disconnects (what a short-lived
-- client, a CGI script or a health check costs through each path).

function thread_init()
   drv = sysbench.sql.driver()
end

function event()
   local con = drv:connect()
   con:query("select 1")
   con:disconnect()
end
