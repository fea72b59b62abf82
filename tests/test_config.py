import pytest

from asyncpatterns.config import (
    DEFAULT_URL,
    ConfigurationError,
    backend_name,
    mask_password,
    resolve_url,
)


def test_argument_wins_over_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DATABASE_URL", "postgresql+asyncpg://u@h/env")
    assert resolve_url("sqlite+aiosqlite:///arg.db").database == "arg.db"
    assert resolve_url().database == "env"


def test_embedded_sqlite_is_the_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DATABASE_URL", raising=False)
    assert str(resolve_url()) == DEFAULT_URL
    assert backend_name() == "sqlite"


@pytest.mark.parametrize(
    ("written", "driver"),
    [
        ("postgresql://u@h/d", "postgresql+asyncpg"),
        ("postgres://u@h/d", "postgresql+asyncpg"),
        ("mysql://u@h/d", "mysql+aiomysql"),
        ("mariadb://u@h/d", "mysql+aiomysql"),
        ("mariadb+aiomysql://u@h/d", "mysql+aiomysql"),
        ("sqlite:///x.db", "sqlite+aiosqlite"),
    ],
)
def test_bare_schemes_get_the_async_driver(written: str, driver: str) -> None:
    assert resolve_url(written).drivername == driver


def test_mariadb_is_the_mysql_backend() -> None:
    assert backend_name("mariadb://u@h/d") == "mysql"


def test_unknown_scheme_is_one_clear_error() -> None:
    with pytest.raises(ConfigurationError, match="Unknown database backend 'oracle'"):
        resolve_url("oracle://scott:tiger@h/d")


def test_unknown_scheme_error_hides_the_password() -> None:
    with pytest.raises(ConfigurationError) as info:
        resolve_url("oracle://scott:tiger@h/d")
    assert "tiger" not in str(info.value)
    assert "***" in str(info.value)


def test_unparseable_url_is_one_clear_error_without_password() -> None:
    with pytest.raises(ConfigurationError, match="Could not parse") as info:
        resolve_url("not a url://user:s3cret@")
    assert "s3cret" not in str(info.value)


@pytest.mark.parametrize(
    "url",
    ["postgresql+asyncpg://user:s3cret@host:5432/db", "mysql://root:s3cret@h/d"],
)
def test_mask_password(url: str) -> None:
    masked = mask_password(url)
    assert "s3cret" not in masked
    assert "***" in masked


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("mysql://root:p@ss@127.0.0.1/db", "mysql://***@127.0.0.1/db"),  # unescaped "@"
        ("postgresql://u@h/d?password=s3cret", "postgresql://u@h/d?password=***"),
        (
            "postgresql://u:s3cret@h/d?sslpassword=s3cret&app=x",
            "postgresql://u:***@h/d?app=x&sslpassword=***",
        ),
        (
            "mysql://root:1@127.0.0.1/db",
            "mysql://root:***@127.0.0.1/db",
        ),  # "1" is not masked in the host
        ("mysql://root:root@h/d", "mysql://root:***@h/d"),  # nor in the user name
        ("postgresql://u:a%40b@h/d", "postgresql://u:***@h/d"),  # an escaped "@" is fine
    ],
)
def test_mask_password_hides_only_the_secrets(url: str, shown: str) -> None:
    assert mask_password(url) == shown


def test_an_unescaped_at_sign_is_refused_with_what_to_do() -> None:
    with pytest.raises(ConfigurationError, match="percent-encode '@'.*%40") as info:
        resolve_url("mysql://root:p@ss@127.0.0.1/db")
    assert "p@ss" not in str(info.value) and "ss@" not in str(info.value)
