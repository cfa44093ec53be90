-- outboundd spool schema for PostgreSQL, version 5: a cheaper record(), and
-- small bodies kept in their rows.
--
-- outboundd_record does what it did in version 2, with less work per call
-- and plans that stay good however large the queue grows (PL/pgSQL keeps the
-- generic plans it made while a new queue's tables were tiny):
--
-- - The messages a batch may finish are serialised by a transaction-scoped
--   advisory lock per message (in the server's memory), not by locking
--   their rows: no scan of messages (a generic plan made on a small table
--   scanned it whole), no tuple lock written to the table and the WAL.
--   finalize_message takes the same lock (queries.sql, lock_message).
-- - The lease guard is in the UPDATE's own WHERE (rechecked on the newest
--   row version if another transaction changed it meanwhile) instead of a
--   separate SELECT ... FOR UPDATE of the same rows first: one lock per row
--   instead of two.
-- - A finished message is one whose recipients are all in a final state,
--   written as "none is NOT IN the final states", which only the index on
--   recipients(queue_id) serves: "status IN (unfinished states)" matched
--   the partial index recipients_unfinished_domain, and the generic plan
--   read all of it (every unfinished recipient in the queue) per message.

CREATE OR REPLACE FUNCTION outboundd_record(
    p_now              double precision,
    p_queue_ids        text[],
    p_recipient_id     bigint[],
    p_owner            text[],
    p_attempt          integer[],
    p_started_at       double precision[],
    p_finished_at      double precision[],
    p_mx_host          text[],
    p_mx_ip            text[],
    p_port             integer[],
    p_tls              text[],
    p_auth             text[],
    p_code             integer[],
    p_status           text[],
    p_response         text[],
    p_outcome          text[],
    p_reason           text[],
    p_tls_policy       text[],
    p_tls_policy_met   integer[],
    p_new_status       text[],
    p_failure          integer[],
    p_next_attempt_at  double precision[],
    p_last_code        integer[],
    p_last_status      text[],
    p_last_response    text[],
    p_final_at         double precision[],
    p_delay_notified   integer[]
) RETURNS TABLE (kind text, ref text)
LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    -- Sorted: two batches that share messages never wait on each other in a circle.
    PERFORM pg_advisory_xact_lock(hashtext('outboundd-message'), x.h)
       FROM (SELECT DISTINCT hashtext(q) AS h FROM unnest(p_queue_ids) AS q ORDER BY 1) AS x;

    RETURN QUERY
    WITH x AS (
        SELECT * FROM unnest(p_recipient_id, p_owner, p_attempt, p_started_at, p_finished_at,
                             p_mx_host, p_mx_ip, p_port, p_tls, p_auth, p_code, p_status,
                             p_response, p_outcome, p_reason, p_tls_policy,
                             p_tls_policy_met, p_new_status, p_failure,
                             p_next_attempt_at, p_last_code, p_last_status, p_last_response,
                             p_final_at, p_delay_notified)
            AS x(id, owner, attempt, started_at, finished_at, mx_host, mx_ip, port, tls, auth,
                 code, status, response, outcome, reason, tls_policy, tls_policy_met,
                 new_status, failure,
                 next_attempt_at, last_code, last_status, last_response, final_at,
                 delay_notified)
    ), a AS (
        INSERT INTO attempt_log (recipient_id, attempt, started_at, finished_at, mx_host, mx_ip,
                                 port, tls, auth, code, status, response, outcome, reason,
                                 tls_policy, tls_policy_met)
        SELECT x.id, x.attempt, x.started_at, x.finished_at, x.mx_host, x.mx_ip, x.port, x.tls,
               x.auth, x.code, x.status, x.response, x.outcome, x.reason, x.tls_policy,
               x.tls_policy_met
          FROM x
    ), u AS (
        UPDATE recipients r
           SET status = x.new_status, attempts = r.attempts + 1,
               failures = r.failures + x.failure,
               next_attempt_at = x.next_attempt_at, last_attempt_at = x.finished_at,
               last_code = x.last_code, last_status = x.last_status,
               last_response = x.last_response, last_mx = x.mx_host,
               finished_at = x.final_at, final_reason = x.reason,
               delay_notified = greatest(r.delay_notified, x.delay_notified),
               held_status = NULL, lease_owner = NULL, lease_expires_at = NULL
          FROM x
         WHERE r.id = x.id AND r.status = 'sending' AND r.lease_owner = x.owner
        RETURNING r.id
    )
    SELECT 'updated'::text, u.id::text FROM u;

    RETURN QUERY
    WITH f AS (
        UPDATE messages SET finished_at = p_now
         WHERE queue_id = ANY (p_queue_ids) AND finished_at IS NULL
           AND NOT EXISTS (SELECT 1 FROM recipients r
                            WHERE r.queue_id = messages.queue_id
                              AND r.status NOT IN ('delivered', 'bounced', 'dropped'))
        RETURNING messages.queue_id
    ), d AS (
        DELETE FROM bodies WHERE bodies.queue_id IN (SELECT f.queue_id FROM f)
    )
    SELECT 'finished'::text, f.queue_id FROM f;
END
$$;

-- A body of up to about 8 KB is kept in its row instead of TOAST's table
-- (toast_tuple_target, default 2 KB, is the row size above which values are
-- moved out): one heap tuple written, read and deleted per message instead
-- of that plus a chunk row per 2 KB and their index entries.  Larger
-- bodies are moved out as before.  Applies to rows written from now on.
ALTER TABLE bodies SET (toast_tuple_target = 8160);
