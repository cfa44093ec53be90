-- outboundd spool schema for PostgreSQL, version 4: accept_leased() as one call.
--
-- A process that delivers and has free slots accepts new mail already leased
-- to itself and starts the delivery from the values in hand, as the SQLite
-- backend does: no claim call, no NOTIFY waking every host's scheduler to
-- look for work that is already taken, no next_due_at after their empty
-- claims.  What a claim guarantees holds here too:
--
-- 1. Groups with a per-domain limit (p_g_cap not NULL) take the domain's
--    advisory lock first, in sorted order, the same lock outboundd_claim
--    takes, so accepts and claims of every host count a domain's slots one
--    at a time.
-- 2. The slots each domain already holds on every host are counted by a
--    statement that starts after those locks are held (a VOLATILE function
--    takes a new snapshot per statement), and a group is leased only while
--    its domain has room; the others are inserted due, as a plain accept's,
--    and the NOTIFY sent at commit wakes the schedulers for them.
-- 3. Everything is one statement's worth of round trip and one commit, group
--    committed like every accept: the messages, bodies, recipients (leased
--    or due), the DSN links.
--
-- p_r_group gives each recipient its lease group (an index into the p_g_*
-- arrays; NULL: not to be leased).  Rows: the leased recipients, in the
-- 15 columns every leasing statement returns.

CREATE FUNCTION outboundd_accept(
    p_m_queue_id        text[],
    p_m_mail_from       text[],
    p_m_size            integer[],
    p_m_received_at     double precision[],
    p_m_auth_user       text[],
    p_m_client_ip       text[],
    p_m_env_id          text[],
    p_m_ret             text[],
    p_m_smtputf8        integer[],
    p_m_body_8bit       integer[],
    p_m_notes           text[],
    p_m_dsn_of          text[],
    p_b_body            bytea[],
    p_r_queue_id        text[],
    p_r_recipient       text[],
    p_r_domain          text[],
    p_r_notify          text[],
    p_r_orcpt           text[],
    p_r_next_attempt_at double precision[],
    p_r_group           integer[],
    p_g_domain          text[],
    p_g_cap             integer[],
    p_g_split           boolean[],
    p_g_owner           text[],
    p_g_expires         double precision[],
    p_l_queue_id        text[],
    p_l_recipient       text[],
    p_l_dsn_queue_id    text[]
) RETURNS TABLE (
    o_id bigint, o_queue_id text, o_domain text, o_recipient text, o_notify text,
    o_orcpt text, o_attempts integer, o_failures integer, o_held_status text,
    o_last_code integer, o_last_status text, o_last_response text, o_last_mx text,
    o_delay_notified integer, o_dsn_queue_id text
)
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    v_take boolean[];
BEGIN
    PERFORM pg_advisory_xact_lock(hashtext('outboundd-domain'), hashtext(x.d))
       FROM (SELECT DISTINCT g.d FROM unnest(p_g_domain, p_g_cap) AS g(d, cap)
              WHERE g.cap IS NOT NULL ORDER BY 1) AS x;

    -- Per group: leased or not.  A group is leased while its domain's slots
    -- on every host (leased groups, or recipients with p_g_split), plus the
    -- groups of this batch before it, stay below the limit.
    SELECT array_agg(c.cap IS NULL
                     OR c.place <= c.cap - coalesce(CASE WHEN c.split THEN t.k_rows
                                                         ELSE t.k_msgs END, 0)
                     ORDER BY c.n)
      INTO v_take
      FROM (SELECT g.d, g.cap, g.split, g.n,
                   row_number() OVER (PARTITION BY g.d ORDER BY g.n) AS place
              FROM unnest(p_g_domain, p_g_cap, p_g_split) WITH ORDINALITY AS g(d, cap, split, n)
           ) AS c
      LEFT JOIN (SELECT s.domain, count(*) AS k_rows, count(DISTINCT s.queue_id) AS k_msgs
                   FROM recipients s
                  WHERE s.status = 'sending'
                    AND s.domain = ANY (SELECT g.d FROM unnest(p_g_domain, p_g_cap) AS g(d, cap)
                                         WHERE g.cap IS NOT NULL)
                  GROUP BY s.domain) AS t
             ON t.domain = c.d AND c.cap IS NOT NULL;

    INSERT INTO messages (queue_id, mail_from, size, received_at, auth_user, client_ip,
                          env_id, ret, smtputf8, body_8bit, notes, dsn_of)
    SELECT * FROM unnest(p_m_queue_id, p_m_mail_from, p_m_size, p_m_received_at,
                         p_m_auth_user, p_m_client_ip, p_m_env_id, p_m_ret, p_m_smtputf8,
                         p_m_body_8bit, p_m_notes, p_m_dsn_of);
    INSERT INTO bodies (queue_id, body) SELECT * FROM unnest(p_m_queue_id, p_b_body);

    IF cardinality(p_l_queue_id) > 0 THEN  -- (planned on its own, a scan of recipients)
        UPDATE recipients SET dsn_queue_id = x.dsn
          FROM unnest(p_l_queue_id, p_l_recipient, p_l_dsn_queue_id) AS x(q, a, dsn)
         WHERE recipients.queue_id = x.q AND recipients.recipient = x.a
           AND recipients.dsn_queue_id IS NULL;
    END IF;

    IF EXISTS (SELECT 1 FROM unnest(p_r_group) AS x(grp)
                WHERE x.grp IS NULL OR NOT v_take[x.grp]) THEN
        PERFORM pg_notify('outboundd_work', '');
    END IF;

    RETURN QUERY
    WITH x AS (
        SELECT x.q, x.a, x.d, x.n, x.o, x.t, x.grp,
               coalesce(v_take[x.grp], false) AS take
          FROM unnest(p_r_queue_id, p_r_recipient, p_r_domain, p_r_notify, p_r_orcpt,
                      p_r_next_attempt_at, p_r_group) AS x(q, a, d, n, o, t, grp)
    ), ins AS (
        INSERT INTO recipients (queue_id, recipient, domain, notify, orcpt, status,
                                next_attempt_at, held_status, lease_owner, lease_expires_at)
        SELECT x.q, x.a, x.d, x.n, x.o, CASE WHEN x.take THEN 'sending' ELSE 'queued' END,
               x.t, CASE WHEN x.take THEN 'queued' END,
               CASE WHEN x.take THEN p_g_owner[x.grp] END,
               CASE WHEN x.take THEN p_g_expires[x.grp] END
          FROM x
        RETURNING recipients.id, recipients.queue_id, recipients.domain,
                  recipients.recipient, recipients.notify, recipients.orcpt,
                  recipients.attempts, recipients.failures, recipients.held_status,
                  recipients.last_code, recipients.last_status, recipients.last_response,
                  recipients.last_mx, recipients.delay_notified, recipients.dsn_queue_id
    )
    SELECT * FROM ins WHERE ins.held_status IS NOT NULL;
END
$$;


-- outboundd_claim as in version 3, with one more column, next_due: when
-- nothing due is free it returns one row of NULLs whose next_due is the
-- earliest next attempt of every waiting recipient (NULL: none), where the
-- caller used to ask next_due_at in a second call.  Until something new is
-- queued (a NOTIFY, or this process's own accept, release or deferral) the
-- caller need not claim again before then: a process whose deliveries end
-- one by one no longer sends an empty claim to the server after each.

DROP FUNCTION outboundd_claim(double precision, text, double precision, integer, integer,
                              text[], boolean, integer, text[], integer[]);

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
    m_notes text, m_dsn_of text, m_body bytea, next_due double precision
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
                THEN (SELECT b.body FROM bodies b WHERE b.queue_id = l.queue_id) END,
           NULL::double precision
      FROM l JOIN messages m ON m.queue_id = l.queue_id;
END
$$;
