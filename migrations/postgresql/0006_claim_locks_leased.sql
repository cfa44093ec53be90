-- outboundd spool schema for PostgreSQL, version 6: a claim with a per-domain
-- limit locks only the rows it leases.
--
-- Version 4's outboundd_claim locked the earliest p_scan (4 x limit) due rows
-- FOR UPDATE SKIP LOCKED before choosing, and the scheduler's limit is its
-- free slots: draining one domain under domain_concurrency_max 20 with
-- concurrency_max 100, a claim locked some 300 rows to lease the handful the
-- domain had room for, each lock a tuple write and a WAL record.
--
-- With a per-domain limit (p_domain_room not NULL) the claims of every host
-- that could take a domain's rows already wait in turn for the domain's
-- advisory lock, so the row locks bought nothing there:
--
-- 1. The earliest due rows are read without locks (their domains are what
--    the advisory locks need).
-- 2. The domains' advisory locks are taken, in sorted order, as before.
-- 3. The statement that chooses and leases starts after those locks are
--    held (a new snapshot: READ COMMITTED, VOLATILE), reads the same rows
--    again and keeps those still due, so a lease another claim committed
--    meanwhile is seen; then it locks only the chosen rows, FOR UPDATE SKIP
--    LOCKED (a claim still never waits for a row: a row a flush or an
--    operator holds is left for the next claim), and leases them.
--
-- When every domain read is full once its lock is held, the claim ends
-- there, with no rows (as before, when it read and locked them all first).
--
-- Without a per-domain limit nothing serialises the claims, and the rows
-- are locked FOR UPDATE SKIP LOCKED while scanned, as in version 4, so
-- hosts claiming at the same moment take different rows.  Everything else
-- (arguments, the rows returned, the empty claim's next_due row) is as in
-- version 4.

CREATE OR REPLACE FUNCTION outboundd_claim(
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
    m_notes text, m_dsn_of text, m_body bytea, next_due double precision
)
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    v_ids     bigint[];
    v_qids    text[];
    v_domains text[];
BEGIN
    IF p_domain_room IS NULL THEN
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
    ELSE
        -- Only the domains: the rows are read again once their locks are held.
        SELECT array_agg(DISTINCT d.domain) INTO v_domains
          FROM (SELECT r.domain FROM recipients r
                 WHERE r.status IN ('queued', 'deferred') AND r.next_attempt_at <= p_now
                   AND r.domain <> ALL (p_exclude)
                 ORDER BY r.next_attempt_at, r.id
                 LIMIT p_scan) AS d;
    END IF;
    IF v_domains IS NULL THEN
        -- Nothing due that is free: one row of NULLs whose next_due is the
        -- earliest next attempt of every waiting recipient (a row another
        -- claim holds locked is due now), so the caller knows, until
        -- something new is queued, when to look again.
        RETURN QUERY SELECT NULL::bigint, NULL::text, NULL::text, NULL::text, NULL::text,
            NULL::text, NULL::integer, NULL::integer, NULL::text, NULL::integer, NULL::text,
            NULL::text, NULL::text, NULL::integer, NULL::text, NULL::text, NULL::text,
            NULL::integer, NULL::double precision, NULL::text, NULL::text, NULL::text,
            NULL::integer, NULL::integer, NULL::text, NULL::text, NULL::bytea,
            (SELECT min(r.next_attempt_at) FROM recipients r
              WHERE r.status IN ('queued', 'deferred'));
        RETURN;
    END IF;

    IF p_domain_room IS NOT NULL THEN
        PERFORM pg_advisory_xact_lock(hashtext('outboundd-domain'), hashtext(x.d))
           FROM (SELECT DISTINCT unnest(v_domains) AS d ORDER BY 1) AS x;
        -- Every domain full (on every host, or for this host's room): nothing
        -- to read again or to choose from.
        IF NOT EXISTS (
            SELECT 1
              FROM unnest(v_domains) AS d(domain)
              LEFT JOIN unnest(p_room_domains, p_room_slots) AS rm(domain, slots)
                     ON rm.domain = d.domain
             WHERE least(coalesce(rm.slots, p_domain_room),
                         p_domain_room - (SELECT CASE WHEN p_always_split THEN count(*)
                                                      ELSE count(DISTINCT s.queue_id) END
                                            FROM recipients s
                                           WHERE s.status = 'sending' AND s.domain = d.domain))
                   > 0) THEN
            RETURN;
        END IF;
    END IF;

    RETURN QUERY
    WITH due AS MATERIALIZED (
        -- Without a per-domain limit: the rows locked above.
        SELECT u.id, u.queue_id, u.domain, u.n
          FROM unnest(v_ids, v_qids, v_domains) WITH ORDINALITY AS u(id, queue_id, domain, n)
         WHERE p_domain_room IS NULL
        UNION ALL
        -- With one: the earliest due rows of the locked domains, read now that
        -- the locks are held, so a lease committed meanwhile is seen.
        SELECT d.id, d.queue_id, d.domain,
               row_number() OVER (ORDER BY d.next_attempt_at, d.id) AS n
          FROM (SELECT r.id, r.queue_id, r.domain, r.next_attempt_at FROM recipients r
                 WHERE p_domain_room IS NOT NULL
                   AND r.status IN ('queued', 'deferred') AND r.next_attempt_at <= p_now
                   AND r.domain = ANY (v_domains) AND r.domain <> ALL (p_exclude)
                 ORDER BY r.next_attempt_at, r.id
                 LIMIT p_scan) AS d
    ), groups AS (
        -- One row per group, at the place of its earliest-due recipient.
        SELECT min(due.n) AS n, due.queue_id, due.domain,
               CASE WHEN p_always_split THEN due.id END AS one
          FROM due
         GROUP BY due.queue_id, due.domain, CASE WHEN p_always_split THEN due.id END
    ), taken AS MATERIALIZED (
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
    ), chosen AS MATERIALIZED (
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
    ), picked AS (
        -- The chosen groups' rows, locked (without a per-domain limit they
        -- already are: the lock is then taken again at no cost).
        SELECT r.id
          FROM chosen c
          JOIN due ON due.queue_id = c.queue_id AND due.domain = c.domain
                  AND (c.one IS NULL OR c.one = due.id)
          JOIN recipients r ON r.id = due.id
         WHERE r.status IN ('queued', 'deferred')
           FOR UPDATE OF r SKIP LOCKED
    ), l AS (
        UPDATE recipients
           SET held_status = status, status = 'sending',
               lease_owner = p_owner, lease_expires_at = p_expires
          FROM picked
         WHERE recipients.id = picked.id AND recipients.status IN ('queued', 'deferred')
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
                THEN (SELECT b.body FROM bodies b WHERE b.queue_id = l.queue_id) END,
           NULL::double precision
      FROM l JOIN messages m ON m.queue_id = l.queue_id;
END
$$;
