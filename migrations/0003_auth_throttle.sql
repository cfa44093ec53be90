-- outboundd spool schema, version 3: the AUTH failure throttle's counts.
--
-- One row per client key (an IP, or an IPv6 /64).  Kept in the spool so that
-- every process accepting on the same sockets (smtp.ini nodes) counts one
-- client once: a client spread over several processes is one client.
-- Rows are pruned by the processes themselves (forgotten after an hour,
-- ended blocks, at most smtp's max entries).
CREATE TABLE auth_throttle (
    client        TEXT PRIMARY KEY,
    failures      INTEGER NOT NULL,
    last_failure  REAL NOT NULL,
    blocked_until REAL
) STRICT, WITHOUT ROWID;

CREATE INDEX auth_throttle_last_failure ON auth_throttle (last_failure);
