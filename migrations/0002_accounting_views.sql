-- outboundd spool schema, version 2: two more accounting views (docs/accounting.md).
--
-- Views only: no table changes, so every version-1 query keeps working.

-- One row per submitted message (DSNs included, marked by dsn_of): who sent
-- it, from where, how big, how many recipients.  Exposes messages.auth_user
-- so "volume per AUTH user" needs no join against internal tables.
CREATE VIEW submissions AS
SELECT m.queue_id                                                 AS queue_id,
       m.mail_from                                                AS mail_from,
       m.auth_user                                                AS auth_user,
       m.client_ip                                                AS client_ip,
       strftime('%Y-%m-%dT%H:%M:%fZ', m.received_at, 'unixepoch') AS received_at,
       strftime('%Y-%m-%dT%H:%M:%fZ', m.finished_at, 'unixepoch') AS finished_at,
       m.size                                                     AS size,
       (SELECT count(*) FROM recipients r WHERE r.queue_id = m.queue_id) AS recipients,
       m.dsn_of                                                   AS dsn_of
  FROM messages m;

-- One row per recipient that a failure DSN reported: the link from the
-- original recipient to the bounce message, and how that bounce fared.
CREATE VIEW dsn_reports AS
SELECT r.queue_id                                                 AS queue_id,
       r.recipient                                                AS recipient,
       r.status                                                   AS status,
       r.last_status                                              AS last_status,
       r.dsn_queue_id                                             AS dsn_queue_id,
       d.recipient                                                AS dsn_recipient,
       d.status                                                   AS dsn_status,
       strftime('%Y-%m-%dT%H:%M:%fZ', d.finished_at, 'unixepoch') AS dsn_finished_at
  FROM recipients r
  LEFT JOIN recipients d ON d.queue_id = r.dsn_queue_id
 WHERE r.dsn_queue_id IS NOT NULL;
