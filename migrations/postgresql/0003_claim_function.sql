-- outboundd spool schema for PostgreSQL, version 3: claim() as one call.
--
-- A claim was a transaction of six statements (BEGIN, the due rows, the
-- domains' advisory locks, their slot counts, the lease with the fetch of
-- the messages, COMMIT): six round trips for what is often one message.  As
-- one function call it is one round trip and one commit.  What it does and
-- guarantees is unchanged:
--
-- 1. The earliest-due recipients are locked FOR UPDATE SKIP LOCKED: hosts
--    claiming at the same moment take different rows instead of waiting.
-- 2. With a per-domain limit (p_domain_room not NULL), an advisory lock per
--    domain, taken in sorted order (two claims never wait on each other in
--    a circle), serialises the hosts that count and take a domain's slots.
-- 3. The slots each domain already holds on every host are counted by a
--    statement that starts after those locks are held: a VOLATILE function
--    takes a new snapshot per statement (READ COMMITTED), so it sees every
--    lease another host committed before releasing the lock.
-- 4. The groups (all due recipients of one message and domain, or each
--    recipient with p_always_split) are taken in due order while their
--    domain has room (the smaller of this host's room, p_room_*, and the
--    limit less the slots taken), up to p_limit groups; they are leased to
--    p_owner, and their messages fetched, in the same statement.
--
-- Rows: the leased recipient's 15 columns, then its message's 12; the body
-- only on the lowest-id leased row of its message (NULL on the others), so a
-- body crosses the wire once however many of its recipients are leased.

CREATE FUNCTION outboundd_claim(
    p_now          double precision,
    p_owner        text,
    p_expires      double precision,
    p_limit        integer,
    p_scan         integer,
    p_exclude      text[],
    p_always_split boolean,
    p_domain_room  integer,
    p_room_domains text[],
    p_room_slots   integer[]
) RETURNS TABLE (
    r_id bigint, r_queue_id text, r_domain text, r_recipient text, r_notify text,
    r_orcpt text, r_attempts integer, r_failures integer, r_held_status text,
    r_last_code integer, r_last_status text, r_last_response text, r_last_mx text,
    r_delay_notified integer, r_dsn_queue_id text,
    m_queue_id text, m_mail_from text, m_size integer, m_received_at double precision,
    m_auth_user text, m_env_id text, m_ret text, m_smtputf8 integer, m_body_8bit integer,
    m_notes text, m_dsn_of text, m_body bytea
)
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    v_ids     bigint[];
    v_qids    text[];
    v_domains text[];
BEGIN
    SELECT array_agg(d.id ORDER BY d.next_attempt_at, d.id),
           array_agg(d.queue_id ORDER BY d.next_attempt_at, d.id),
           array_agg(d.domain ORDER BY d.next_attempt_at, d.id)
      INTO v_ids, v_qids, v_domains
      FROM (SELECT r.id, r.queue_id, r.domain, r.next_attempt_at FROM recipients r
             WHERE r.status IN ('queued', 'deferred') AND r.next_attempt_at <= p_now
               AND r.domain <> ALL (p_exclude)
             ORDER BY r.next_attempt_at, r.id
             LIMIT p_scan
               FOR UPDATE SKIP LOCKED) AS d;
    IF v_ids IS NULL THEN
        RETURN;
    END IF;

    IF p_domain_room IS NOT NULL THEN
        PERFORM pg_advisory_xact_lock(hashtext('outboundd-domain'), hashtext(x.d))
           FROM (SELECT DISTINCT unnest(v_domains) AS d ORDER BY 1) AS x;
    END IF;

    RETURN QUERY
    WITH due AS (
        SELECT u.id, u.queue_id, u.domain, u.n
          FROM unnest(v_ids, v_qids, v_domains) WITH ORDINALITY AS u(id, queue_id, domain, n)
    ), groups AS (
        -- One row per group, at the place of its earliest-due recipient.
        SELECT min(due.n) AS n, due.queue_id, due.domain,
               CASE WHEN p_always_split THEN due.id END AS one
          FROM due
         GROUP BY due.queue_id, due.domain, CASE WHEN p_always_split THEN due.id END
    ), taken AS (
        -- Slots each domain holds on every host: leased groups (or recipients).
        SELECT s.domain,
               CASE WHEN p_always_split THEN count(*) ELSE count(DISTINCT s.queue_id) END AS k
          FROM recipients s
         WHERE p_domain_room IS NOT NULL AND s.status = 'sending'
           AND s.domain = ANY (v_domains)
         GROUP BY s.domain
    ), ranked AS (
        SELECT g.n, g.queue_id, g.domain, g.one,
               row_number() OVER (PARTITION BY g.domain ORDER BY g.n) AS place
          FROM groups g
    ), chosen AS (
        -- A group is taken while its domain has room; the first p_limit of those.
        SELECT c.queue_id, c.domain, c.one
          FROM ranked c
          LEFT JOIN taken t ON t.domain = c.domain
          LEFT JOIN unnest(p_room_domains, p_room_slots) AS rm(domain, slots)
                 ON rm.domain = c.domain
         WHERE p_domain_room IS NULL
            OR c.place <= least(coalesce(rm.slots, p_domain_room),
                                p_domain_room - coalesce(t.k, 0))
         ORDER BY c.n
         LIMIT p_limit
    ), l AS (
        UPDATE recipients
           SET held_status = status, status = 'sending',
               lease_owner = p_owner, lease_expires_at = p_expires
          FROM due JOIN chosen c
                 ON c.queue_id = due.queue_id AND c.domain = due.domain
                AND (c.one IS NULL OR c.one = due.id)
         WHERE recipients.id = due.id AND recipients.status IN ('queued', 'deferred')
        RETURNING recipients.id, recipients.queue_id, recipients.domain,
                  recipients.recipient, recipients.notify, recipients.orcpt,
                  recipients.attempts, recipients.failures, recipients.held_status,
                  recipients.last_code, recipients.last_status, recipients.last_response,
                  recipients.last_mx, recipients.delay_notified, recipients.dsn_queue_id
    )
    SELECT l.id, l.queue_id, l.domain, l.recipient, l.notify, l.orcpt, l.attempts,
           l.failures, l.held_status, l.last_code, l.last_status, l.last_response,
           l.last_mx, l.delay_notified, l.dsn_queue_id,
           m.queue_id, m.mail_from, m.size, m.received_at, m.auth_user, m.env_id, m.ret,
           m.smtputf8, m.body_8bit, m.notes, m.dsn_of,
           CASE WHEN l.id = min(l.id) OVER (PARTITION BY l.queue_id)
                THEN (SELECT b.body FROM bodies b WHERE b.queue_id = l.queue_id) END
      FROM l JOIN messages m ON m.queue_id = l.queue_id;
END
$$;
