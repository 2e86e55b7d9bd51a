-- Deliveries claimed (jobs.delivered_at set) whose post to the chat has not finished yet. A
-- bot process killed mid-post leaves its row here; the next process of that platform unclaims
-- those jobs at start-up, before its delivery worker runs, so arq's re-run of the delivery job
-- posts the result instead of finding it delivered (at least once: a post that went out just
-- before the kill is posted again). A table of its own, so no row or column of 0001–0005
-- changes.
CREATE TABLE deliveries_in_flight (
    job_id TEXT PRIMARY KEY REFERENCES jobs (id) ON DELETE CASCADE,
    since  TEXT NOT NULL
);
