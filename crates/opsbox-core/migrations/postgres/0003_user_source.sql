-- Where a user comes from: NULL for users made with opsbox (or imported once), or the
-- htpasswd file a server keeps them in step with (a line removed there removes the user).
ALTER TABLE users ADD COLUMN source TEXT;
