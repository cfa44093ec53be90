-- Every statement the spool runs, by name.  Python never assembles SQL text;
-- it picks a statement here and binds parameters.  Each block starts with
-- "-- name: NAME" and runs to the next block.

-- name: insert_message
-- Numbered parameters, bound from a tuple in column order (one executemany for
-- every message of an accept batch; a tuple binds faster than a dict).
INSERT INTO messages (queue_id, mail_from, body_file, size, received_at, auth_user, client_ip,
                      env_id, ret, smtputf8, body_8bit, notes, dsn_of)
VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13)

-- name: insert_recipient
-- ?1 queue_id, ?2 recipient, ?3 domain, ?4 notify, ?5 orcpt, ?6 next_attempt_at.
INSERT INTO recipients (queue_id, recipient, domain, notify, orcpt, status, next_attempt_at)
VALUES (?1, ?2, ?3, ?4, ?5, 'queued', ?6)

-- name: max_recipient_id
-- The ids insert_recipient_leased gives follow this one (inside the write transaction).
SELECT coalesce(max(id), 0) FROM recipients

-- name: insert_recipient_leased
-- A new recipient leased at once to the process that accepted it (it delivers it next):
-- ?1 id, ?2 .. ?7 as insert_recipient, ?8 owner, ?9 expires.  The id comes from the
-- caller (max_recipient_id + 1 on, as SQLite would choose it), so one executemany
-- writes a batch's leased recipients and nothing is read back row by row.
INSERT INTO recipients (id, queue_id, recipient, domain, notify, orcpt, status, next_attempt_at,
                        held_status, lease_owner, lease_expires_at)
VALUES (?1, ?2, ?3, ?4, ?5, ?6, 'sending', ?7, 'queued', ?8, ?9)

-- name: link_dsn
-- A DSN was queued for these recipients of the original message.
UPDATE recipients SET dsn_queue_id = :dsn_queue_id
 WHERE queue_id = :queue_id AND recipient = :recipient AND dsn_queue_id IS NULL

-- name: due_groups
-- The earliest-due (queue_id, domain) groups a claim chooses from (it leases them with
-- claim_chosen_groups in the same transaction).  Every statement that leases recipients
-- returns the same columns (Spool._claims reads them).
SELECT DISTINCT queue_id, domain FROM recipients
 WHERE status IN ('queued', 'deferred') AND next_attempt_at <= :now
   AND domain NOT IN (SELECT value FROM json_each(:exclude))
 ORDER BY next_attempt_at
 LIMIT :limit

-- name: due_recipients
-- always_split: the earliest-due recipients, each its own group.
SELECT id, queue_id, domain FROM recipients
 WHERE status IN ('queued', 'deferred') AND next_attempt_at <= :now
   AND domain NOT IN (SELECT value FROM json_each(:exclude))
 ORDER BY next_attempt_at
 LIMIT :limit

-- name: claim_chosen_groups
-- Lease the due recipients of the chosen [queue_id, domain] groups.
UPDATE recipients
   SET held_status = status, status = 'sending',
       lease_owner = :owner, lease_expires_at = :expires
 WHERE status IN ('queued', 'deferred') AND next_attempt_at <= :now
   AND (queue_id, domain) IN (
        SELECT json_extract(value, '$[0]'), json_extract(value, '$[1]') FROM json_each(:groups))
RETURNING id, queue_id, domain, recipient, notify, orcpt, attempts, failures, held_status,
          last_code, last_status, last_response, last_mx, delay_notified, dsn_queue_id

-- name: claim_chosen_recipients
UPDATE recipients
   SET held_status = status, status = 'sending',
       lease_owner = :owner, lease_expires_at = :expires
 WHERE status IN ('queued', 'deferred') AND next_attempt_at <= :now
   AND id IN (SELECT value FROM json_each(:ids))
RETURNING id, queue_id, domain, recipient, notify, orcpt, attempts, failures, held_status,
          last_code, last_status, last_response, last_mx, delay_notified, dsn_queue_id

-- name: messages_by_ids
SELECT queue_id, mail_from, body_file, size, received_at, auth_user, env_id, ret, smtputf8,
       body_8bit, notes, dsn_of
  FROM messages WHERE queue_id IN (SELECT value FROM json_each(:ids))

-- name: record_held
-- record(), for a whole batch: which of these recipients does its owner still hold?
-- ?1 a JSON array of [id, owner]; one row, a JSON array of the ids held.
SELECT json_group_array(r.id)
  FROM json_each(?1) AS j JOIN recipients AS r ON r.id = j.value ->> 0
 WHERE r.status = 'sending' AND r.lease_owner = j.value ->> 1

-- name: insert_attempt
-- Numbered parameters, bound from a tuple in column order (one executemany writes
-- the rows of every record() of a batch; a tuple binds in two thirds of the time of a dict).
INSERT INTO attempt_log (recipient_id, attempt, started_at, finished_at, mx_host, mx_ip, port,
                         tls, auth, code, status, response, outcome, reason,
                         tls_policy, tls_policy_met)
VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16)

-- name: update_after_attempt
-- ?1 id, ?2 owner, ?3 status, ?4 failure (0/1), ?5 next_attempt_at, ?6 finished_at,
-- ?7 code, ?8 status_code, ?9 response, ?10 mx_host, ?11 final_at, ?12 reason,
-- ?13 delay_notified (0/1); bound from a tuple in this order.
UPDATE recipients
   SET status = ?3, attempts = attempts + 1, failures = failures + ?4,
       next_attempt_at = ?5, last_attempt_at = ?6,
       last_code = ?7, last_status = ?8, last_response = ?9,
       last_mx = ?10, finished_at = ?11, final_reason = ?12,
       delay_notified = max(delay_notified, ?13),
       held_status = NULL, lease_owner = NULL, lease_expires_at = NULL
 WHERE id = ?1 AND status = 'sending' AND lease_owner = ?2

-- name: record_finishing
-- record(), for a whole batch: which of these messages (?1, a JSON array of queue IDs)
-- now have every recipient final?  One row, a JSON array of [queue_id, body_file].
SELECT json_group_array(json_array(m.queue_id, m.body_file))
  FROM messages AS m
 WHERE m.queue_id IN (SELECT value FROM json_each(?1)) AND m.finished_at IS NULL
   AND NOT EXISTS (SELECT 1 FROM recipients r
                    WHERE r.queue_id = m.queue_id
                      AND (r.status = 'queued' OR r.status = 'sending'
                           OR r.status = 'deferred'))

-- name: record_finish
-- Mark them finished: ?1 a JSON array of [queue_id, finished_at].
UPDATE messages SET finished_at = j.value ->> 1
  FROM json_each(?1) AS j
 WHERE messages.queue_id = j.value ->> 0

-- name: finish_messages
-- Messages among these whose every recipient is final: mark them finished.
UPDATE messages SET finished_at = :now
 WHERE queue_id IN (SELECT value FROM json_each(:ids)) AND finished_at IS NULL
   AND NOT EXISTS (SELECT 1 FROM recipients r
                    WHERE r.queue_id = messages.queue_id
                      AND (r.status = 'queued' OR r.status = 'sending'
                           OR r.status = 'deferred'))
RETURNING queue_id, body_file

-- name: release
-- Give a lease back without an attempt (send_email delay, shutdown).
UPDATE recipients
   SET status = held_status, held_status = NULL, lease_owner = NULL, lease_expires_at = NULL,
       next_attempt_at = coalesce(:next_attempt_at, next_attempt_at)
 WHERE id IN (SELECT value FROM json_each(:ids)) AND status = 'sending' AND lease_owner = :owner

-- name: release_owner
UPDATE recipients
   SET status = held_status, held_status = NULL, lease_owner = NULL, lease_expires_at = NULL
 WHERE status = 'sending' AND lease_owner = :owner

-- name: renew_leases
UPDATE recipients SET lease_expires_at = :expires
 WHERE status = 'sending' AND lease_owner = :owner

-- name: release_expired
UPDATE recipients
   SET status = held_status, held_status = NULL, lease_owner = NULL, lease_expires_at = NULL,
       next_attempt_at = min(next_attempt_at, :now)
 WHERE status = 'sending' AND lease_expires_at < :now

-- name: lease_owners
SELECT DISTINCT lease_owner FROM recipients WHERE status = 'sending'

-- name: release_owner_crashed
UPDATE recipients
   SET status = held_status, held_status = NULL, lease_owner = NULL, lease_expires_at = NULL,
       next_attempt_at = min(next_attempt_at, :now)
 WHERE status = 'sending' AND lease_owner = :owner

-- name: next_due
SELECT min(next_attempt_at) FROM recipients WHERE status IN ('queued', 'deferred')

-- name: unfinished_messages
SELECT queue_id, body_file FROM messages WHERE finished_at IS NULL

-- name: finished_body_names
SELECT queue_id FROM messages
 WHERE queue_id IN (SELECT value FROM json_each(:ids)) AND finished_at IS NOT NULL

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
   AND (:domain IS NULL OR domain = :domain)

-- name: message_exists
SELECT 1 FROM messages WHERE queue_id = :queue_id

-- name: list_recipients
SELECT r.queue_id, m.mail_from, r.recipient, r.domain, r.status, r.attempts,
       r.next_attempt_at, r.last_code, r.last_status, r.last_response, r.last_mx,
       m.received_at, r.finished_at, m.size
  FROM recipients r JOIN messages m ON m.queue_id = r.queue_id
 WHERE (:status IS NULL OR r.status = :status)
   AND (:all_states OR r.status IN ('queued', 'sending', 'deferred'))
   AND (:domain IS NULL OR r.domain = :domain)
   AND (:sender IS NULL OR m.mail_from = :sender)
   AND (:received_before IS NULL OR m.received_at < :received_before)
 ORDER BY m.received_at, r.queue_id, r.id
 LIMIT :limit

-- name: show_message
SELECT queue_id, mail_from, body_file, size, received_at, auth_user, client_ip, env_id, ret,
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
 WHERE status = 'queued' OR status = 'sending' OR status = 'deferred'
 GROUP BY status

-- name: stats_top_domains
SELECT domain, count(*) AS n FROM recipients
 WHERE status = 'queued' OR status = 'sending' OR status = 'deferred'
 GROUP BY domain ORDER BY n DESC, domain LIMIT :limit

-- name: stats_oldest_deferred
SELECT min(m.received_at) FROM recipients r JOIN messages m ON m.queue_id = r.queue_id
 WHERE r.status = 'deferred'

-- name: stats_recent_outcomes
SELECT outcome, count(*) FROM attempt_log WHERE finished_at >= :since GROUP BY outcome

-- name: stats_queue_bytes
SELECT coalesce(sum(size), 0), count(*) FROM messages WHERE finished_at IS NULL

-- name: throttle_get
-- The AUTH throttle's entry for one client key.
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
-- Ended blocks and clients not seen for a long time.
DELETE FROM auth_throttle
 WHERE (blocked_until IS NOT NULL AND blocked_until <= :now)
    OR (blocked_until IS NULL AND last_seen <= :forget_before)

-- name: throttle_prune_excess
-- Beyond :keep entries, the least recently seen go first.
DELETE FROM auth_throttle
 WHERE client IN (SELECT client FROM auth_throttle
                   ORDER BY last_seen DESC LIMIT -1 OFFSET :keep)
