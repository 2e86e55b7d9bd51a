-- Jobs sent while the job queue stopped answering, so the bot could not tell whether Redis
-- took them. The bot checks each against Redis at start-up and then periodically until it can
-- tell: there → the row here goes; not there → the job is reported failed (its quota units
-- given back, its owner told), then the row here goes. A table of its own, so no row or
-- column of 0001–0004 changes.
CREATE TABLE unconfirmed_jobs (
    job_id TEXT PRIMARY KEY REFERENCES jobs (id) ON DELETE CASCADE,
    since  TEXT NOT NULL
);
