-- decide_scans keeps one plan per statement for the session (a generic plan), never re-plans.
--
-- Why: PostgreSQL chose a custom plan for the ticket lock (`ticket_code = ANY (v_codes)`) on
-- every call, ~0.1 ms of planning each time, for the same index scan the generic plan does
-- (enable_seqscan is off in this function). Its other statements were generic already.
-- pg_stat_statements, 400 calls of 2 fresh scans: the lock statement 401 plans, the rest 6 each;
-- per call (client side, median of 600): 1,340 -> 1,260 us, 3 pairs.
ALTER FUNCTION decide_scans(uuid, timestamptz, jsonb) SET plan_cache_mode = force_generic_plan;
