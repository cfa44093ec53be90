-- outboundd spool schema, version 4: outbound TLS policy (MTA-STS, DANE).
--
-- sts_policies: the MTA-STS policy cache (RFC 8461 §5.1), one row per
-- recipient domain, shared by every process on this spool and kept across
-- restarts.  policy_id is the id of the _mta-sts TXT record the policy was
-- fetched under (a new id means a new policy); mx holds the policy's mx
-- patterns, one per line; expires_at is fetched_at + max_age.
CREATE TABLE sts_policies (
    domain      TEXT    PRIMARY KEY,
    policy_id   TEXT    NOT NULL,
    mode        TEXT    NOT NULL CHECK (mode IN ('enforce', 'testing', 'none')),
    mx          TEXT    NOT NULL,
    max_age     INTEGER NOT NULL,
    fetched_at  REAL    NOT NULL,
    expires_at  REAL    NOT NULL
) STRICT;

-- Which TLS policy applied to an attempt and whether the connection met it.
ALTER TABLE attempt_log ADD COLUMN tls_policy TEXT
    CHECK (tls_policy IN ('none', 'opportunistic', 'mta-sts', 'dane'));
ALTER TABLE attempt_log ADD COLUMN tls_policy_met INTEGER;

DROP VIEW attempts;
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
       CAST(round((a.finished_at - a.started_at) * 1000) AS INTEGER) AS duration_ms,
       a.tls_policy                                             AS tls_policy,
       a.tls_policy_met                                         AS tls_policy_met
  FROM attempt_log a
  JOIN recipients r ON r.id = a.recipient_id;
