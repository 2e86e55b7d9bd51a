-- Moderation: blocked-prompt rules, quotas, bans, and the moderators' audit log.
-- Only new tables: the skeleton's subjects and jobs are untouched, so nothing in them can be lost.

-- Per-workspace switches. A workspace without a row uses the defaults written here.
CREATE TABLE workspace_settings (
    platform            TEXT NOT NULL,
    workspace           TEXT NOT NULL,
    use_default_rules   INTEGER NOT NULL DEFAULT 1 CHECK (use_default_rules IN (0, 1)),
    reveal_blocked_rule INTEGER NOT NULL DEFAULT 0 CHECK (reveal_blocked_rule IN (0, 1)),
    -- Bumped on every rule or switch change, so each bot process can tell its cached,
    -- compiled filter is stale without recompiling on every prompt.
    rules_version       INTEGER NOT NULL DEFAULT 0,
    updated_by          TEXT,
    updated_at          TEXT NOT NULL,
    PRIMARY KEY (platform, workspace)
);

-- Moderators' blocked words/phrases and RE2 regexes, on top of the built-in list.
CREATE TABLE blocked_rules (
    id         INTEGER PRIMARY KEY,
    platform   TEXT NOT NULL,
    workspace  TEXT NOT NULL,
    kind       TEXT NOT NULL CHECK (kind IN ('word', 'regex')),
    pattern    TEXT NOT NULL,
    added_by   TEXT NOT NULL,
    created_at TEXT NOT NULL,
    UNIQUE (platform, workspace, kind, pattern)
);

-- Prompts that a rule stopped, for moderators to review (/mod blocked).
CREATE TABLE blocked_attempts (
    id              INTEGER PRIMARY KEY,
    platform        TEXT NOT NULL,
    workspace       TEXT NOT NULL,
    user_id         TEXT NOT NULL,
    rule_label      TEXT NOT NULL,
    fragment        TEXT NOT NULL,
    prompt          TEXT NOT NULL,
    negative_prompt TEXT NOT NULL DEFAULT '',
    created_at      TEXT NOT NULL
);
CREATE INDEX blocked_attempts_by_workspace ON blocked_attempts (platform, workspace, id);

-- Quota units spent, one row per job. A row stops counting once released (the job failed on
-- the engine, was cancelled, or a moderator reset the user's day); it is kept for history.
CREATE TABLE quota_usage (
    job_id         TEXT PRIMARY KEY REFERENCES jobs (id) ON DELETE CASCADE,
    platform       TEXT NOT NULL,
    workspace      TEXT NOT NULL,
    user_id        TEXT NOT NULL,
    kind           TEXT NOT NULL CHECK (kind IN ('images', 'trainings')),
    units          INTEGER NOT NULL CHECK (units >= 0),
    day            TEXT NOT NULL,               -- UTC date the units count against
    created_at     TEXT NOT NULL,
    released_at    TEXT,
    release_reason TEXT
);
CREATE INDEX quota_usage_by_user_day ON quota_usage (platform, workspace, user_id, day);

-- Limits that replace the configured defaults: for a user, for a role, or the workspace's
-- own defaults (scope 'workspace', target_id ''). NULL in a column means "not overridden".
CREATE TABLE quota_overrides (
    platform        TEXT NOT NULL,
    workspace       TEXT NOT NULL,
    scope           TEXT NOT NULL CHECK (scope IN ('user', 'role', 'workspace')),
    target_id       TEXT NOT NULL,
    daily_images    INTEGER CHECK (daily_images >= 0),
    daily_trainings INTEGER CHECK (daily_trainings >= 0),
    max_active_jobs INTEGER CHECK (max_active_jobs >= 0),
    set_by          TEXT NOT NULL,
    updated_at      TEXT NOT NULL,
    PRIMARY KEY (platform, workspace, scope, target_id)
);

-- One row per banned user; expires_at NULL means until unbanned.
CREATE TABLE bans (
    platform   TEXT NOT NULL,
    workspace  TEXT NOT NULL,
    user_id    TEXT NOT NULL,
    reason     TEXT NOT NULL DEFAULT '',
    banned_by  TEXT NOT NULL,
    created_at TEXT NOT NULL,
    expires_at TEXT,
    PRIMARY KEY (platform, workspace, user_id)
);

-- Every moderator action: who did what to whom, when.
CREATE TABLE audit_log (
    id           INTEGER PRIMARY KEY,
    platform     TEXT NOT NULL,
    workspace    TEXT NOT NULL,
    moderator_id TEXT NOT NULL,
    action       TEXT NOT NULL,
    target       TEXT NOT NULL DEFAULT '',
    detail       TEXT NOT NULL DEFAULT '',
    created_at   TEXT NOT NULL
);
CREATE INDEX audit_log_by_workspace ON audit_log (platform, workspace, id);

-- /mod queue and the per-user active-jobs cap look jobs up by workspace and status.
CREATE INDEX jobs_by_workspace_status ON jobs (platform, workspace, status);
