-- A workspace's default base model: the name of one of DREAMBOT_MODELS that /train uses when
-- it names none, and that prompts without subjects are drawn on. NULL: the configured default.
-- A name later dropped from the configuration is ignored (the configured default is used).
-- Only a nullable column is added: no row of 0001–0003 is rewritten, so nothing can be lost.
ALTER TABLE workspace_settings ADD COLUMN default_model TEXT;
