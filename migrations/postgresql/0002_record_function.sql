-- outboundd spool schema for PostgreSQL, version 2: record() as one call.
--
-- A delivery's record is a lock of its message rows, the attempt rows, the
-- lease-guarded state changes and the finishing of messages whose every
-- recipient is now final.  As one function call it is one round trip and
-- one commit, however many deliveries' records the spool batches into it.
-- Each statement in it sees what committed before it began (READ COMMITTED,
-- a volatile function), so the finishing check, made after the message
-- locks are held, sees every other host's committed record.

CREATE FUNCTION outboundd_record(
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
    PERFORM 1 FROM messages WHERE queue_id = ANY (p_queue_ids) ORDER BY queue_id FOR UPDATE;

    RETURN QUERY
    WITH x AS (
        SELECT * FROM unnest(p_recipient_id, p_owner, p_attempt, p_started_at, p_finished_at,
                             p_mx_host, p_mx_ip, p_port, p_tls, p_auth, p_code, p_status,
                             p_response, p_outcome, p_reason, p_new_status, p_failure,
                             p_next_attempt_at, p_last_code, p_last_status, p_last_response,
                             p_final_at, p_delay_notified)
            AS x(id, owner, attempt, started_at, finished_at, mx_host, mx_ip, port, tls, auth,
                 code, status, response, outcome, reason, new_status, failure,
                 next_attempt_at, last_code, last_status, last_response, final_at,
                 delay_notified)
    ), held AS (
        SELECT r.id FROM recipients r JOIN x ON x.id = r.id
         WHERE r.status = 'sending' AND r.lease_owner = x.owner
           FOR UPDATE OF r
    ), a AS (
        INSERT INTO attempt_log (recipient_id, attempt, started_at, finished_at, mx_host, mx_ip,
                                 port, tls, auth, code, status, response, outcome, reason)
        SELECT x.id, x.attempt, x.started_at, x.finished_at, x.mx_host, x.mx_ip, x.port, x.tls,
               x.auth, x.code, x.status, x.response, x.outcome, x.reason
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
         WHERE r.id = x.id AND r.id IN (SELECT id FROM held)
        RETURNING r.id
    )
    SELECT 'updated'::text, u.id::text FROM u;

    RETURN QUERY
    WITH f AS (
        UPDATE messages SET finished_at = p_now
         WHERE queue_id = ANY (p_queue_ids) AND finished_at IS NULL
           AND NOT EXISTS (SELECT 1 FROM recipients r
                            WHERE r.queue_id = messages.queue_id
                              AND r.status IN ('queued', 'sending', 'deferred'))
        RETURNING messages.queue_id
    ), d AS (
        DELETE FROM bodies WHERE bodies.queue_id IN (SELECT f.queue_id FROM f)
    )
    SELECT 'finished'::text, f.queue_id FROM f;
END
$$;
