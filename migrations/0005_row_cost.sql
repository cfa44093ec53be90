-- outboundd spool schema, version 5: cheaper row writes on the delivery path.
--
-- No column, constraint meaning or view changes: only how three CHECKs
-- and one partial index are written, and two indexes nobody reads are gone.
--
-- 1. SQLite (3.40 here) checks `x IN (a, b, c, ...)` with more than two
--    constants by building a temporary b-tree of the constants, and a CHECK
--    constraint or a partial index's WHERE does that for every row written:
--    a new ephemeral database (open, create, insert each constant, close),
--    some 20,000 instructions each.  Writing a recipient, its attempt row and
--    its new state built seven of them, more than half of SQLite's work per
--    delivered recipient (callgrind: 375k -> 146k instructions in
--    sqlite3_step for a one-recipient message accepted, leased and recorded).
--    The same test written as `x = a OR x = b OR ...` is a few comparisons.
--    A CHECK cannot be altered, so the tables' stored definitions are edited
--    as SQLite documents for changes that leave the stored rows as they are
--    ("ALTER TABLE", section "Making Other Kinds Of Table Schema Changes"):
--    writable_schema, an UPDATE of sqlite_schema, and a schema reload
--    (writable_schema = RESET); the DDL below bumps the schema cookie, so
--    every other connection reloads the schema too.  The replaced texts are
--    exactly those migrations 0001 and 0004 stored (shipped migrations are
--    never edited), and every row already satisfies the new form, which
--    accepts and refuses exactly the same values (NULL included).
-- 2. recipients_unfinished_domain is rebuilt with the same OR form; queries
--    that want it (outboundctl stats) spell their status test the same way,
--    since SQLite uses a partial index only for a WHERE that implies its own.
-- 3. Two indexes no query reads (the accounting views wrap these columns in
--    strftime, which no index serves) cost a b-tree insert per row:
--    recipients_finished, for every recipient reaching a final state, and
--    messages_received, for every message accepted.
PRAGMA writable_schema = ON;

UPDATE sqlite_schema
   SET sql = replace(sql,
       'CHECK (status IN
                        (''queued'', ''sending'', ''deferred'', ''delivered'', ''bounced'', ''dropped''))',
       'CHECK (status = ''queued'' OR status = ''sending'' OR status = ''deferred''
                        OR status = ''delivered'' OR status = ''bounced'' OR status = ''dropped'')')
 WHERE type = 'table' AND name = 'recipients';

UPDATE sqlite_schema
   SET sql = replace(replace(sql,
       'CHECK (outcome IN (''delivered'', ''deferred'', ''bounced'', ''dropped''))',
       'CHECK (outcome = ''delivered'' OR outcome = ''deferred''
                                OR outcome = ''bounced'' OR outcome = ''dropped'')'),
       'CHECK (tls_policy IN (''none'', ''opportunistic'', ''mta-sts'', ''dane''))',
       'CHECK (tls_policy = ''none'' OR tls_policy = ''opportunistic''
           OR tls_policy = ''mta-sts'' OR tls_policy = ''dane'')')
 WHERE type = 'table' AND name = 'attempt_log';

PRAGMA writable_schema = RESET;

DROP INDEX recipients_unfinished_domain;
CREATE INDEX recipients_unfinished_domain ON recipients (domain)
    WHERE status = 'queued' OR status = 'sending' OR status = 'deferred';

DROP INDEX recipients_finished;
DROP INDEX messages_received;
