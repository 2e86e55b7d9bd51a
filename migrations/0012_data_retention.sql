-- What dreambot keeps about people, and for how long.
--
-- images_deleted_at: when the job's stored images (its outputs folder in the artifact store,
-- live previews included) were deleted, by the retention sweep (DREAMBOT_KEEP_IMAGES_DAYS
-- after the job ended) or by /mydata delete. Set, the sweep passes the job over, and Vary and
-- Upscale of its result say the image is no longer stored (Reroll still works: it needs only
-- the prompt). NULL, as every existing row gets: the images are (still) stored.
ALTER TABLE jobs ADD COLUMN images_deleted_at TEXT;

-- data_deleted_at: when the job's prompt, options and messages were replaced at its owner's
-- request (/mydata delete, /mod delete-user-data). The row itself stays: its quota units are
-- moderation records (quota_usage references it), and its result's buttons then say that its
-- data was deleted.
ALTER TABLE jobs ADD COLUMN data_deleted_at TEXT;

-- The sweep looks, per platform, for finished image jobs whose images are still stored, the
-- oldest first; once swept, a job leaves this index.
CREATE INDEX jobs_with_stored_images ON jobs (platform, updated_at)
    WHERE images_deleted_at IS NULL AND kind = 'generate';

-- /mydata counts a user's moderation records: the audit entries about them by target.
CREATE INDEX audit_log_by_target ON audit_log (platform, workspace, target);
