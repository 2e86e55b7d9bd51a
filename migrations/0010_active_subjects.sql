-- The subject a user chose with /use as their [V], per user per workspace. No row: [V] is the
-- user's newest ready subject. A chosen subject that is not ready (any more) is passed over
-- the same way, and deleting it (/forget, /mod delete-subject, training a failed name again)
-- deletes the choice (ON DELETE CASCADE). Only the user's own subjects are chosen (the store
-- checks the owner on insert). A table of its own, so no row or column of 0001–0009 changes.
CREATE TABLE active_subjects (
    platform   TEXT NOT NULL,
    workspace  TEXT NOT NULL,
    user_id    TEXT NOT NULL,
    subject_id TEXT NOT NULL REFERENCES subjects (id) ON DELETE CASCADE,
    chosen_at  TEXT NOT NULL,
    PRIMARY KEY (platform, workspace, user_id)
);
-- Deleting a subject looks its choices up by subject.
CREATE INDEX active_subjects_by_subject ON active_subjects (subject_id);
