"""Secrets: the Redis password comes from its file, never shows in what may be printed or recorded;
API keys are compared in constant time."""

from __future__ import annotations

from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st

from app.api import key_matches
from tasks.settings import REDACTED, Settings, redact, redact_url, with_password

PASSWORDS = st.text(st.characters(codec="utf-8", exclude_categories=("Cs", "Cc")), min_size=1, max_size=40)


def test_the_password_file_completes_the_url(tmp_path: Path) -> None:
    secret = tmp_path / "redis.password"
    secret.write_text("s3cr:t/@pw\n")
    env = {"RINGSERVE_REDIS_URL": "redis://127.0.0.1:6390/0", "RINGSERVE_REDIS_PASSWORD_FILE": str(secret)}
    settings = Settings.from_env(env)
    assert settings.redis_url == "redis://:s3cr%3At%2F%40pw@127.0.0.1:6390/0"
    assert "s3cr" not in repr(settings)
    assert Settings.from_env({"RINGSERVE_REDIS_URL": "redis://h:1/2"}).redis_url == "redis://h:1/2"


@given(PASSWORDS)
def test_a_url_with_a_password_is_shown_without_it(password: str) -> None:
    url = with_password("redis://127.0.0.1:6390/3", password)
    shown = redact_url(url)
    assert shown == f"redis://:{REDACTED}@127.0.0.1:6390/3"
    assert redact_url("rediss://user:pw@host:1/0") == f"rediss://user:{REDACTED}@host:1/0"
    assert redact_url("redis://host:1/0") == "redis://host:1/0"


def test_settings_that_hold_secrets_are_redacted() -> None:
    assert redact("API_KEYS", "k1,k2") == REDACTED
    assert redact("RINGSERVE_REDIS_PASSWORD", "x") == REDACTED
    assert redact("SOME_TOKEN", "x") == REDACTED
    assert redact("REDIS_PASSWORD_FILE", "/run/secrets/redis.password") == "/run/secrets/redis.password"
    assert redact("REDIS_URL", "redis://:pw@h:1/0") == f"redis://:{REDACTED}@h:1/0"
    assert redact("MAX_BATCH_SIZE", "32") == "32"


def test_api_keys_match_exactly() -> None:
    keys = ("alpha-key", "beta-key")
    assert key_matches("beta-key", keys) and key_matches("alpha-key", keys)
    assert not key_matches("beta-ke", keys) and not key_matches("beta-keyy", keys)
    assert not key_matches("", keys) and not key_matches("BETA-KEY", keys)
    assert key_matches("ключ", ("ключ",))
