-- Jobs queued by a result's Reroll / Vary / Upscale button: the job under whose result the
-- button was (redo_of) and which button (reroll, vary:N, upscale:N, N the image from 0). While
-- such a job waits or runs, the same button of the same result pressed again by the same user
-- (the job's owner) queues nothing: the answer points at this job. A table of its own, so no
-- row or column of 0001–0007 changes.
CREATE TABLE redo_jobs (
    job_id  TEXT PRIMARY KEY REFERENCES jobs (id) ON DELETE CASCADE,
    redo_of TEXT NOT NULL,
    button  TEXT NOT NULL
);
CREATE INDEX redo_jobs_by_button ON redo_jobs (redo_of, button);
