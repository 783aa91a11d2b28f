"""The commented broadcaster.toml that `broadcaster init` writes."""

STARTER_CONFIG = """\
# broadcaster.toml — incident-broadcaster settings.
# Every key can be overridden by an environment variable: BROADCASTER_<KEY>
# (nested keys with a double underscore, e.g. BROADCASTER_DISPATCH__POLL_SECONDS).
# Secrets are never written here: each one names an environment variable or a file.

# Where incidents, updates and deliveries are kept. SQLite by default (a file next to
# this one); PostgreSQL for scale: "postgresql://user@host/dbname".
store = "sqlite:///broadcaster.db"

# Shown on the status page and in every message that links to it.
page_title = "Example Co. status"
status_page_url = "https://status.example.com"

# Times in messages ("Next update by 14:30 CET") use this zone.
timezone = "UTC"

# Your own templates (optional): same layout as the shipped ones; yours win.
# templates_dir = "templates"

# Channels used when a command names none.
default_channels = ["status-page", "partners"]

# Components your users know, name = the name they see.
[components]
api = "Public API"
app = "Mobile app"
website = "Website"

# The status page, status JSON, in-app banner script and Atom feed, written as static
# files to a folder any host can serve (independent of your own infrastructure).
[channels.status-page]
type = "banner"
languages = ["en", "fr"]
output = "public"
# And/or to an S3-compatible bucket behind a CDN (needs the `s3` extra):
# bucket = "acme-status"
# endpoint_url = "https://<account-id>.r2.cloudflarestorage.com"   # not for AWS S3
# region = "auto"
# access_key_id = { env = "STATUS_BUCKET_KEY_ID" }
# secret_access_key = { env = "STATUS_BUCKET_SECRET" }

# Signed JSON webhooks (Standard Webhooks) to partners or your own systems.
[channels.partners]
type = "webhook"
languages = ["en"]
targets = [
  { name = "ops-bridge", url = "https://hooks.example.com/incidents" },
]
secret = { env = "PARTNERS_WEBHOOK_SECRET" }   # or { file = "/run/secrets/webhook" }
# Retries: exponential backoff with jitter, honouring Retry-After, for at most an hour.
# backoff_seconds = 2
# deadline_seconds = 3600
# rate_limit = { per_target_per_second = 10, per_target_burst = 5 }
"""
