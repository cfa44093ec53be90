-- Every statement the PostgreSQL backend runs, by name (see ../queries.sql for
-- SQLite's).  Parameters are written :name; the loader turns them into $1,
-- $2 ... once.  Batches bind arrays and unnest them, so one statement (one
-- round trip) carries a whole group commit.

-- name: accept_batch
-- A group commit: the messages, their bodies and their recipients of every
-- accept in the batch, in one statement (one round trip, one commit).  Other
-- hosts' schedulers are woken by the NOTIFY, sent at commit.  A batch with
-- DSNs in it takes accept_batch_links: the links' UPDATE, even with nothing
-- to link, was planned as a scan of every recipient in the queue.
WITH m AS (
    INSERT INTO messages (queue_id, mail_from, size, received_at, auth_user, client_ip,
                          env_id, ret, smtputf8, body_8bit, notes, dsn_of)
    SELECT * FROM unnest(:m_queue_id::text[], :m_mail_from::text[], :m_size::integer[],
                         :m_received_at::float8[], :m_auth_user::text[], :m_client_ip::text[],
                         :m_env_id::text[], :m_ret::text[], :m_smtputf8::integer[],
                         :m_body_8bit::integer[], :m_notes::text[], :m_dsn_of::text[])
), b AS (
    INSERT INTO bodies (queue_id, body)
    SELECT * FROM unnest(:m_queue_id::text[], :b_body::bytea[])
), r AS (
    INSERT INTO recipients (queue_id, recipient, domain, notify, orcpt, status, next_attempt_at)
    SELECT q, a, d, n, o, 'queued', t
      FROM unnest(:r_queue_id::text[], :r_recipient::text[], :r_domain::text[],
                  :r_notify::text[], :r_orcpt::text[], :r_next_attempt_at::float8[])
           AS x(q, a, d, n, o, t)
)
SELECT pg_notify('outboundd_work', '')

-- name: accept_batch_links
-- accept_batch for a batch with DSNs: the same, and their links.
WITH m AS (
    INSERT INTO messages (queue_id, mail_from, size, received_at, auth_user, client_ip,
                          env_id, ret, smtputf8, body_8bit, notes, dsn_of)
    SELECT * FROM unnest(:m_queue_id::text[], :m_mail_from::text[], :m_size::integer[],
                         :m_received_at::float8[], :m_auth_user::text[], :m_client_ip::text[],
                         :m_env_id::text[], :m_ret::text[], :m_smtputf8::integer[],
                         :m_body_8bit::integer[], :m_notes::text[], :m_dsn_of::text[])
), b AS (
    INSERT INTO bodies (queue_id, body)
    SELECT * FROM unnest(:m_queue_id::text[], :b_body::bytea[])
), r AS (
    INSERT INTO recipients (queue_id, recipient, domain, notify, orcpt, status, next_attempt_at)
    SELECT q, a, d, n, o, 'queued', t
      FROM unnest(:r_queue_id::text[], :r_recipient::text[], :r_domain::text[],
                  :r_notify::text[], :r_orcpt::text[], :r_next_attempt_at::float8[])
           AS x(q, a, d, n, o, t)
), l AS (
    UPDATE recipients SET dsn_queue_id = x.dsn
      FROM unnest(:l_queue_id::text[], :l_recipient::text[], :l_dsn_queue_id::text[])
           AS x(q, a, dsn)
     WHERE recipients.queue_id = x.q AND recipients.recipient = x.a
       AND recipients.dsn_queue_id IS NULL
)
SELECT pg_notify('outboundd_work', '')

-- name: accept_leased_batch
-- A group commit with some accepts leased to their process
-- (migrations/postgresql/0004_accept_leased.sql): the same rows as
-- accept_batch, each lease group taken only while its domain has room on
-- every host.  Rows: the leased recipients (the 15 columns of claim's).
SELECT * FROM outboundd_accept(
    :m_queue_id::text[], :m_mail_from::text[], :m_size::integer[], :m_received_at::float8[],
    :m_auth_user::text[], :m_client_ip::text[], :m_env_id::text[], :m_ret::text[],
    :m_smtputf8::integer[], :m_body_8bit::integer[], :m_notes::text[], :m_dsn_of::text[],
    :b_body::bytea[], :r_queue_id::text[], :r_recipient::text[], :r_domain::text[],
    :r_notify::text[], :r_orcpt::text[], :r_next_attempt_at::float8[], :r_group::integer[],
    :g_domain::text[], :g_cap::integer[], :g_split::boolean[], :g_owner::text[],
    :g_expires::float8[], :l_queue_id::text[], :l_recipient::text[], :l_dsn_queue_id::text[])

-- name: release_expired
-- Leases whose holder stopped renewing them (it died, or lost the database):
-- due again, for any host.
UPDATE recipients
   SET status = held_status, held_status = NULL, lease_owner = NULL, lease_expires_at = NULL,
       next_attempt_at = least(next_attempt_at, :now)
 WHERE status = 'sending' AND lease_expires_at < :now

-- name: due_rows
-- due_rows, lease_ids and messages_with_bodies are a claim in separate steps,
-- as tools/pgdrivers.py compares the drivers with; the spool claims with the
-- claim statement below.
-- The earliest-due recipients, locked for this claim; rows another host is
-- claiming right now are skipped, not waited for.
SELECT id, queue_id, domain FROM recipients
 WHERE status IN ('queued', 'deferred') AND next_attempt_at <= :now
   AND domain <> ALL (:exclude::text[])
 ORDER BY next_attempt_at
 LIMIT :limit
   FOR UPDATE SKIP LOCKED

-- name: lease_ids
UPDATE recipients
   SET held_status = status, status = 'sending',
       lease_owner = :owner, lease_expires_at = :expires
 WHERE id = ANY (:ids::bigint[]) AND status IN ('queued', 'deferred')
RETURNING id, queue_id, domain, recipient, notify, orcpt, attempts, failures, held_status,
          last_code, last_status, last_response, last_mx, delay_notified, dsn_queue_id

-- name: messages_with_bodies
SELECT m.queue_id, m.mail_from, m.size, m.received_at, m.auth_user, m.env_id, m.ret,
       m.smtputf8, m.body_8bit, m.notes, m.dsn_of, b.body
  FROM messages m LEFT JOIN bodies b ON b.queue_id = m.queue_id
 WHERE m.queue_id = ANY (:ids::text[])

-- name: claim
-- claim() in one call (migrations/postgresql/0003_claim_function.sql): the due
-- rows locked FOR UPDATE SKIP LOCKED, the domains' advisory locks and slot
-- counts, the lease and the fetch of the messages: one round trip, one
-- commit.  Rows: the leased recipient's 15 columns, then its message's 12
-- (the body only on the lowest-id leased row of each message).
SELECT * FROM outboundd_claim(
    :now, :owner, :expires, :limit, :scan, :exclude::text[], :always_split,
    :domain_room, :room_domains::text[], :room_slots::integer[])

-- name: lock_message
-- Serialise the transactions that may finish one message (records of its
-- domains on several hosts, an operator's delete): each then sees the others'
-- committed states when it checks whether every recipient is final.
-- (outboundd_record takes the same lock: an advisory lock per message, held
-- until the transaction ends, migrations/postgresql/0005_record_cost.sql.)
SELECT pg_advisory_xact_lock(hashtext('outboundd-message'), hashtext(:queue_id))

-- name: record_batch
-- record(), group-committed: the records of every delivery waiting, in one call
-- (migrations/postgresql/0002_record_function.sql).  Rows: ('updated', id) for
-- each recipient whose state changed under its owner's lease, ('finished',
-- queue_id) for each message whose every recipient is now final.
SELECT kind, ref FROM outboundd_record(
    :now, :queue_ids::text[], :recipient_id::bigint[], :owner::text[], :attempt::integer[],
    :started_at::float8[], :finished_at::float8[], :mx_host::text[], :mx_ip::text[],
    :port::integer[], :tls::text[], :auth::text[], :code::integer[], :status::text[],
    :response::text[], :outcome::text[], :reason::text[], :tls_policy::text[],
    :tls_policy_met::integer[], :new_status::text[],
    :failure::integer[], :next_attempt_at::float8[], :last_code::integer[],
    :last_status::text[], :last_response::text[], :final_at::float8[],
    :delay_notified::integer[])

-- name: finish_messages
-- Messages among these whose every recipient is final: mark them finished and
-- delete their bodies.
WITH f AS (
    UPDATE messages SET finished_at = :now
     WHERE queue_id = ANY (:ids::text[]) AND finished_at IS NULL
       AND NOT EXISTS (SELECT 1 FROM recipients r
                        WHERE r.queue_id = messages.queue_id
                          AND r.status IN ('queued', 'sending', 'deferred'))
    RETURNING queue_id
), d AS (
    DELETE FROM bodies WHERE queue_id IN (SELECT queue_id FROM f)
)
SELECT queue_id FROM f

-- name: release
-- Leases given back, guarded by the owner; when the work is due at once
-- (no new next_attempt_at), every host is woken by the same statement: one
-- round trip, its own transaction, the NOTIFY sent at its commit.
WITH r AS (
    UPDATE recipients
       SET status = held_status, held_status = NULL, lease_owner = NULL,
           lease_expires_at = NULL,
           next_attempt_at = coalesce(:next_attempt_at::float8, next_attempt_at)
     WHERE id = ANY (:ids::bigint[]) AND status = 'sending' AND lease_owner = :owner
    RETURNING 1
)
SELECT n, CASE WHEN n > 0 AND :next_attempt_at::float8 IS NULL
               THEN pg_notify('outboundd_work', '') END
  FROM (SELECT count(*) AS n FROM r) AS c

-- name: release_owner
UPDATE recipients
   SET status = held_status, held_status = NULL, lease_owner = NULL, lease_expires_at = NULL
 WHERE status = 'sending' AND lease_owner = :owner

-- name: renew_leases
UPDATE recipients SET lease_expires_at = :expires
 WHERE status = 'sending' AND lease_owner = :owner

-- name: lease_owners
SELECT DISTINCT lease_owner FROM recipients WHERE status = 'sending'

-- name: release_owner_crashed
UPDATE recipients
   SET status = held_status, held_status = NULL, lease_owner = NULL, lease_expires_at = NULL,
       next_attempt_at = least(next_attempt_at, :now)
 WHERE status = 'sending' AND lease_owner = :owner

-- name: next_due
SELECT min(next_attempt_at) FROM recipients WHERE status IN ('queued', 'deferred')

-- name: notify_work
SELECT pg_notify('outboundd_work', '')

-- name: unfinished_without_body
-- Unfinished messages whose body row is gone (it never should be).
SELECT m.queue_id FROM messages m
 WHERE m.finished_at IS NULL AND NOT EXISTS (SELECT 1 FROM bodies b WHERE b.queue_id = m.queue_id)

-- name: body
SELECT body FROM bodies WHERE queue_id = :queue_id

-- name: drop_message_recipients
-- Final state for every unfinished recipient of one message (body lost, operator): the
-- decision is ours, so the row shows its status and reason and no remote reply code.
UPDATE recipients
   SET status = :status, finished_at = :now, final_reason = :reason,
       last_code = NULL, last_status = :status_code, last_response = :response,
       held_status = NULL, lease_owner = NULL, lease_expires_at = NULL
 WHERE queue_id = :queue_id AND status IN ('queued', 'sending', 'deferred')
RETURNING id, recipient, notify, orcpt, attempts, last_code, last_status, last_response, last_mx

-- name: sts_policy_get
SELECT policy_id, mode, mx, max_age, fetched_at, expires_at FROM sts_policies
 WHERE domain = :domain

-- name: sts_policy_put
INSERT INTO sts_policies (domain, policy_id, mode, mx, max_age, fetched_at, expires_at)
VALUES (:domain, :policy_id, :mode, :mx, :max_age, :fetched_at, :expires_at)
    ON CONFLICT (domain) DO UPDATE SET
       policy_id = excluded.policy_id, mode = excluded.mode, mx = excluded.mx,
       max_age = excluded.max_age, fetched_at = excluded.fetched_at,
       expires_at = excluded.expires_at

-- name: control_get
SELECT value FROM control WHERE key = :key

-- name: control_set
INSERT INTO control (key, value) VALUES (:key, :value)
    ON CONFLICT (key) DO UPDATE SET value = excluded.value

-- name: flush_all
UPDATE recipients SET next_attempt_at = :now
 WHERE status IN ('queued', 'deferred') AND next_attempt_at > :now

-- name: flush_domain
UPDATE recipients SET next_attempt_at = :now
 WHERE status IN ('queued', 'deferred') AND next_attempt_at > :now AND domain = :domain

-- name: flush_message
UPDATE recipients SET next_attempt_at = :now
 WHERE status IN ('queued', 'deferred') AND next_attempt_at > :now AND queue_id = :queue_id
   AND (:domain::text IS NULL OR domain = :domain)

-- name: message_exists
SELECT 1 FROM messages WHERE queue_id = :queue_id

-- name: list_recipients
SELECT r.queue_id, m.mail_from, r.recipient, r.domain, r.status, r.attempts,
       r.next_attempt_at, r.last_code, r.last_status, r.last_response, r.last_mx,
       m.received_at, r.finished_at, m.size
  FROM recipients r JOIN messages m ON m.queue_id = r.queue_id
 WHERE (:status::text IS NULL OR r.status = :status)
   AND (:all_states::boolean OR r.status IN ('queued', 'sending', 'deferred'))
   AND (:domain::text IS NULL OR r.domain = :domain)
   AND (:sender::text IS NULL OR m.mail_from = :sender)
   AND (:received_before::float8 IS NULL OR m.received_at < :received_before)
 ORDER BY m.received_at, r.queue_id, r.id
 LIMIT :limit

-- name: show_message
SELECT queue_id, mail_from, size, received_at, auth_user, client_ip, env_id, ret,
       smtputf8, body_8bit, notes, dsn_of, finished_at
  FROM messages WHERE queue_id = :queue_id

-- name: show_recipients
SELECT id, recipient, domain, notify, orcpt, status, attempts, failures, next_attempt_at,
       last_attempt_at, last_code, last_status, last_response, last_mx, lease_owner,
       lease_expires_at, finished_at, final_reason, dsn_queue_id
  FROM recipients WHERE queue_id = :queue_id ORDER BY id

-- name: show_attempts
SELECT a.recipient_id, a.attempt, a.started_at, a.finished_at, a.mx_host, a.mx_ip, a.port,
       a.tls, a.auth, a.code, a.status, a.response, a.outcome, a.reason
  FROM attempt_log a JOIN recipients r ON r.id = a.recipient_id
 WHERE r.queue_id = :queue_id ORDER BY a.recipient_id, a.attempt

-- name: stats_by_status
SELECT status, count(*) FROM recipients
 WHERE status IN ('queued', 'sending', 'deferred')
 GROUP BY status

-- name: stats_top_domains
SELECT domain, count(*) AS n FROM recipients
 WHERE status IN ('queued', 'sending', 'deferred')
 GROUP BY domain ORDER BY n DESC, domain LIMIT :limit

-- name: stats_oldest_deferred
SELECT min(m.received_at) FROM recipients r JOIN messages m ON m.queue_id = r.queue_id
 WHERE r.status = 'deferred'

-- name: stats_recent_outcomes
SELECT outcome, count(*) FROM attempt_log WHERE finished_at >= :since GROUP BY outcome

-- name: stats_queue_bytes
SELECT coalesce(sum(size), 0), count(*) FROM messages WHERE finished_at IS NULL

-- name: throttle_lock
-- Serialise every host's updates of one client's entry (the row may not exist yet).
SELECT pg_advisory_xact_lock(hashtext('outboundd-auth'), hashtext(:client))

-- name: throttle_get
SELECT failures, in_flight, last_seen, blocked_until FROM auth_throttle WHERE client = :client

-- name: throttle_put
INSERT INTO auth_throttle (client, failures, in_flight, last_seen, blocked_until)
VALUES (:client, :failures, :in_flight, :last_seen, :blocked_until)
ON CONFLICT (client) DO UPDATE SET failures = excluded.failures,
       in_flight = excluded.in_flight, last_seen = excluded.last_seen,
       blocked_until = excluded.blocked_until

-- name: throttle_delete
DELETE FROM auth_throttle WHERE client = :client

-- name: throttle_prune_stale
DELETE FROM auth_throttle
 WHERE (blocked_until IS NOT NULL AND blocked_until <= :now)
    OR (blocked_until IS NULL AND last_seen <= :forget_before)

-- name: throttle_prune_excess
DELETE FROM auth_throttle
 WHERE client IN (SELECT client FROM auth_throttle
                   ORDER BY last_seen DESC OFFSET :keep)
