-- The parts of a job's result already posted to the chat (its text, each file by name, its
-- buttons) while the result is being posted. A result too big for one message goes as
-- several; when a later one fails (or the bot is cut off), the delivery runs again and posts
-- only the parts not listed here. A job's rows go once its whole result is posted. A table of
-- its own, so no row or column of 0001–0006 changes.
CREATE TABLE posted_parts (
    job_id    TEXT NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    part      TEXT NOT NULL,
    posted_at TEXT NOT NULL,
    PRIMARY KEY (job_id, part)
);
