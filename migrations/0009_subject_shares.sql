-- Subjects shared on purpose (/share): who besides its owner may draw a subject. shared_with
-- is a user id of the subject's own workspace (platform and workspace come from the subject,
-- so a share never reaches another workspace), or '*' for everyone in that workspace. Only
-- the owner shares and unshares; deleting the subject (/forget, /mod delete-subject, training
-- a failed name again) ends its sharing. A table of its own, so no row or column of
-- 0001–0008 changes.
CREATE TABLE subject_shares (
    subject_id  TEXT NOT NULL REFERENCES subjects (id) ON DELETE CASCADE,
    shared_with TEXT NOT NULL,
    created_at  TEXT NOT NULL,
    PRIMARY KEY (subject_id, shared_with)
);
-- "What is shared with me" looks shares up by user.
CREATE INDEX subject_shares_by_user ON subject_shares (shared_with);
