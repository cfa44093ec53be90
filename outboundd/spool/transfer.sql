-- Named statements of `outboundctl queue migrate` (outboundd/spool/transfer.py).
-- The sqlite_* ones read the source queue; the pg_* ones write the
-- PostgreSQL queue (asyncpg's COPY carries the rows themselves).

-- name: sqlite_messages
SELECT queue_id, mail_from, body_file, size, received_at, auth_user, client_ip, env_id, ret,
       smtputf8, body_8bit, notes, dsn_of, finished_at
  FROM messages
 WHERE queue_id > :after
 ORDER BY queue_id
 LIMIT :limit;

-- name: sqlite_recipients
SELECT id, queue_id, recipient, domain, notify, orcpt, status, attempts, failures,
       next_attempt_at, last_attempt_at, last_code, last_status, last_response, last_mx,
       held_status, lease_owner, lease_expires_at, finished_at, final_reason, dsn_queue_id,
       delay_notified
  FROM recipients
 WHERE id > :after
 ORDER BY id
 LIMIT :limit;

-- name: sqlite_attempts
SELECT id, recipient_id, attempt, started_at, finished_at, mx_host, mx_ip, port, tls, auth,
       code, status, response, outcome, reason, tls_policy, tls_policy_met
  FROM attempt_log
 WHERE id > :after
 ORDER BY id
 LIMIT :limit;

-- name: sqlite_control
SELECT key, value FROM control ORDER BY key;

-- name: pg_message_count
SELECT count(*) FROM messages;

-- name: pg_counts
SELECT (SELECT count(*) FROM messages)                   AS messages,
       (SELECT count(*) FROM attempt_log)                AS attempts,
       (SELECT count(*) FROM bodies)                     AS bodies,
       (SELECT coalesce(sum(octet_length(body)), 0) FROM bodies) AS body_bytes;

-- name: pg_recipient_counts
SELECT status, count(*) FROM recipients GROUP BY status;

-- name: pg_control
SELECT key, value FROM control ORDER BY key;

-- name: pg_control_set
INSERT INTO control (key, value) VALUES (:key, :value)
    ON CONFLICT (key) DO UPDATE SET value = excluded.value;

-- The copied rows keep their ids; new rows must be numbered after them.
-- name: pg_recipient_ids_follow
SELECT setval(pg_get_serial_sequence('recipients', 'id'), coalesce(max(id), 0) + 1, false)
  FROM recipients;

-- name: pg_attempt_ids_follow
SELECT setval(pg_get_serial_sequence('attempt_log', 'id'), coalesce(max(id), 0) + 1, false)
  FROM attempt_log;

-- What the source holds, counted apart from the copy; a lease left by a
-- stopped daemon counts in the status it goes back to.
-- name: sqlite_counts
SELECT (SELECT count(*) FROM messages)    AS messages,
       (SELECT count(*) FROM attempt_log) AS attempts;

-- name: sqlite_recipient_counts
SELECT CASE WHEN status = 'sending' THEN coalesce(held_status, 'queued') ELSE status END,
       count(*)
  FROM recipients
 GROUP BY 1;
