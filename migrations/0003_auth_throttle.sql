-- outboundd spool schema, version 3: the AUTH failure throttle's counts.
--
-- One row per client key (an IP, or an IPv6 /64).  Kept in the spool so that
-- every process accepting on the same sockets (smtp.ini nodes) counts one
-- client once: a client spread over several processes is one client.
-- failures: failed attempts; in_flight: attempts admitted and still being
-- checked (so that a burst of parallel attempts cannot exceed the
-- allowance); last_seen: the latest admission or failure.  Rows are pruned
-- by the processes themselves (forgotten after an hour, ended blocks, a
-- bounded number of rows).
CREATE TABLE auth_throttle (
    client        TEXT PRIMARY KEY,
    failures      INTEGER NOT NULL,
    in_flight     INTEGER NOT NULL,
    last_seen     REAL NOT NULL,
    blocked_until REAL
) STRICT, WITHOUT ROWID;

CREATE INDEX auth_throttle_last_seen ON auth_throttle (last_seen);
