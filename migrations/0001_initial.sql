-- outboundd spool schema, version 1.
--
-- Times are stored as POSIX seconds (REAL) so the scheduler compares numbers;
-- the two public views (deliveries, attempts) show them as ISO-8601 UTC text.

CREATE TABLE messages (
    queue_id      TEXT    PRIMARY KEY,
    mail_from     TEXT    NOT NULL,             -- '' is the null sender
    body_file     TEXT    NOT NULL,             -- relative to the queue directory
    size          INTEGER NOT NULL,
    received_at   REAL    NOT NULL,
    auth_user     TEXT,
    client_ip     TEXT,
    env_id        TEXT,                         -- RFC 3461 ENVID
    ret           TEXT CHECK (ret IN ('FULL', 'HDRS')),
    smtputf8      INTEGER NOT NULL DEFAULT 0,
    body_8bit     INTEGER NOT NULL DEFAULT 0,
    notes         TEXT    NOT NULL DEFAULT '{}', -- JSON object
    dsn_of        TEXT,                         -- for a DSN: the queue ID it reports on
    finished_at   REAL                          -- every recipient final, body deleted
) STRICT;

CREATE INDEX messages_received ON messages (received_at);
CREATE INDEX messages_unfinished ON messages (queue_id) WHERE finished_at IS NULL;
CREATE INDEX messages_dsn_of ON messages (dsn_of) WHERE dsn_of IS NOT NULL;

CREATE TABLE recipients (
    id               INTEGER PRIMARY KEY,
    queue_id         TEXT    NOT NULL REFERENCES messages (queue_id) ON DELETE CASCADE,
    recipient        TEXT    NOT NULL,
    domain           TEXT    NOT NULL,          -- lower-case, as routed
    notify           TEXT,                      -- RFC 3461 NOTIFY
    orcpt            TEXT,                      -- RFC 3461 ORCPT
    status           TEXT    NOT NULL CHECK (status IN
                        ('queued', 'sending', 'deferred', 'delivered', 'bounced', 'dropped')),
    attempts         INTEGER NOT NULL DEFAULT 0,
    failures         INTEGER NOT NULL DEFAULT 0, -- temporary failures, for temp_fail_intervals
    next_attempt_at  REAL    NOT NULL,
    last_attempt_at  REAL,
    last_code        INTEGER,
    last_status      TEXT,
    last_response    TEXT,
    last_mx          TEXT,
    held_status      TEXT CHECK (held_status IN ('queued', 'deferred')), -- status before the lease
    lease_owner      TEXT,
    lease_expires_at REAL,
    finished_at      REAL,
    final_reason     TEXT,                      -- why a final state was reached without a reply
    dsn_queue_id     TEXT,                      -- the DSN that reported this recipient
    delay_notified   INTEGER NOT NULL DEFAULT 0 -- a delay DSN was sent
) STRICT;

CREATE INDEX recipients_queue_id ON recipients (queue_id);
CREATE INDEX recipients_due ON recipients (next_attempt_at)
    WHERE status IN ('queued', 'deferred');
CREATE INDEX recipients_leased ON recipients (lease_expires_at)
    WHERE status = 'sending';
CREATE INDEX recipients_unfinished_domain ON recipients (domain)
    WHERE status IN ('queued', 'sending', 'deferred');
CREATE INDEX recipients_finished ON recipients (finished_at)
    WHERE finished_at IS NOT NULL;

CREATE TABLE attempt_log (
    id            INTEGER PRIMARY KEY,
    recipient_id  INTEGER NOT NULL REFERENCES recipients (id) ON DELETE CASCADE,
    attempt       INTEGER NOT NULL,
    started_at    REAL    NOT NULL,
    finished_at   REAL    NOT NULL,
    mx_host       TEXT,
    mx_ip         TEXT,
    port          INTEGER,
    tls           TEXT,
    auth          TEXT,
    code          INTEGER,
    status        TEXT,
    response      TEXT,
    outcome       TEXT    NOT NULL CHECK (outcome IN ('delivered', 'deferred', 'bounced', 'dropped')),
    reason        TEXT
) STRICT;

CREATE INDEX attempt_log_recipient ON attempt_log (recipient_id);
CREATE INDEX attempt_log_finished ON attempt_log (finished_at);

-- Operator switches shared by every process on this spool (pause, ...).
CREATE TABLE control (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
) STRICT;

-- One row per recipient: the accounting interface (docs/accounting.md).
CREATE VIEW deliveries AS
SELECT r.queue_id                                               AS queue_id,
       m.mail_from                                              AS mail_from,
       r.recipient                                              AS recipient,
       r.domain                                                 AS domain,
       r.status                                                 AS status,
       r.attempts                                               AS attempts,
       CASE WHEN r.status IN ('queued', 'deferred', 'sending')
            THEN strftime('%Y-%m-%dT%H:%M:%fZ', r.next_attempt_at, 'unixepoch') END
                                                                AS next_attempt_at,
       r.last_code                                              AS last_code,
       r.last_status                                            AS last_status,
       r.last_response                                          AS last_response,
       r.last_mx                                                AS last_mx,
       strftime('%Y-%m-%dT%H:%M:%fZ', m.received_at, 'unixepoch') AS received_at,
       strftime('%Y-%m-%dT%H:%M:%fZ', r.finished_at, 'unixepoch') AS finished_at,
       m.size                                                   AS size
  FROM recipients r
  JOIN messages m ON m.queue_id = r.queue_id;

-- One row per recipient per attempt.
CREATE VIEW attempts AS
SELECT r.queue_id                                               AS queue_id,
       r.recipient                                              AS recipient,
       a.attempt                                                AS attempt,
       strftime('%Y-%m-%dT%H:%M:%fZ', a.started_at, 'unixepoch')  AS started_at,
       strftime('%Y-%m-%dT%H:%M:%fZ', a.finished_at, 'unixepoch') AS finished_at,
       a.mx_host                                                AS mx_host,
       a.mx_ip                                                  AS mx_ip,
       a.port                                                   AS port,
       a.tls                                                    AS tls,
       a.auth                                                   AS auth,
       a.code                                                   AS code,
       a.status                                                 AS status,
       a.response                                               AS response,
       a.outcome                                                AS outcome,
       CAST(round((a.finished_at - a.started_at) * 1000) AS INTEGER) AS duration_ms
  FROM attempt_log a
  JOIN recipients r ON r.id = a.recipient_id;
