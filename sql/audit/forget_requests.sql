-- Forget requests, newest first, with their state (pending = accepted, purge not finished).
SELECT requested_at, applied_at, state, requested_by, category, reason, external_ref, target_kind, target, n_samples, request_id
FROM forget_requests
ORDER BY requested_at DESC;
