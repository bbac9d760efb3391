"""Configuration: TOML plus environment overrides, refused at start-up with the field named."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from proxy.catalog.pricing import resolve_price
from proxy.catalog.routes import UnpricedModel, build_routes
from proxy.config import DEFAULT_CONFIG_PATH, ConfigError, Settings, load_settings

MINIMAL = """
[[upstreams]]
name = "mock"
base_url = "http://127.0.0.1:9/v1/"

[[models]]
name = "gpt-4o-mini"
upstream = "mock"
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "proxy.toml"
    path.write_text(text)
    return path


def test_file_values_with_environment_overrides(tmp_path: Path) -> None:
    path = write(tmp_path, "[server]\nport = 8000\nhost = '10.1.2.3'\n" + MINIMAL)
    settings = load_settings(
        path,
        environ={
            "PROXY__SERVER__PORT": "9001",
            "PROXY__AUTH__CACHE_TTL_SECONDS": "0.5",
            "PROXY__REDIS__DATA_DIR": "/var/lib/proxy",
            "REDIS_URL": "redis://10.0.0.5:6380/2",
            "UNRELATED": "ignored",
        },
    )
    assert settings.server.port == 9001  # env wins over the file, parsed as an integer
    assert settings.server.host == "10.1.2.3"  # untouched by env
    assert settings.auth.cache_ttl_seconds == 0.5
    assert settings.redis.data_dir == "/var/lib/proxy"
    assert settings.redis.url == "redis://10.0.0.5:6380/2"
    assert settings.upstreams[0].base_url == "http://127.0.0.1:9/v1"  # trailing slash dropped


def test_config_path_from_environment(tmp_path: Path) -> None:
    path = write(tmp_path, "[server]\nport = 8123\n" + MINIMAL)
    settings = load_settings(environ={"PROXY_CONFIG": str(path)})
    assert settings.server.port == 8123
    assert settings.redis.url == ""  # no REDIS_URL: the embedded default


def test_missing_explicit_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such file"):
        load_settings(tmp_path / "absent.toml", environ={})


def test_missing_file_named_by_proxy_config_is_an_error_too(tmp_path: Path) -> None:
    """Issue 11 item 7: ``--config`` failed on a missing file, ``PROXY_CONFIG`` started an
    empty proxy. One rule: a file that is named must exist."""
    with pytest.raises(ConfigError, match="no such file"):
        load_settings(environ={"PROXY_CONFIG": str(tmp_path / "absent.toml")})


@pytest.mark.parametrize(
    ("text", "env", "field"),
    [
        ("[server]\nport = -1\n", {}, "server.port"),
        ("[server]\nport = 70000\n", {}, "server.port"),
        ("", {"PROXY__SERVER__PORT": "not-a-port"}, "server.port"),
        ("[auth]\ncache_ttl_seconds = 5\n", {}, "auth.cache_ttl_seconds"),
        ("[server]\nmax_body_bytes = 0\n", {}, "server.max_body_bytes"),
        ("[timeouts]\nread_seconds = 0\n", {}, "timeouts.read_seconds"),
        ("[limits.defaults.member]\nrpm = 0\n", {}, "limits.defaults.member.rpm"),
        ("[limits.defaults.guest]\nrpm = 5\n", {}, "limits.defaults.guest"),
        # Issue 11 item 2: past 2**53 the admit script stored NaN levels.
        ("[limits.defaults.member]\ntpm = 9007199254740993\n", {}, "limits.defaults.member.tpm"),
        ("[limits.defaults.member]\nrpd = 1000000000001\n", {}, "limits.defaults.member.rpd"),
        ("[limits.defaults.member]\nconcurrency = 1000001\n", {}, "member.concurrency"),
        ("[metering]\nunknown_price = 'free'\n", {}, "metering.unknown_price"),
    ],
)
def test_bad_values_name_the_field(
    tmp_path: Path, text: str, env: dict[str, str], field: str
) -> None:
    path = write(tmp_path, text + MINIMAL)
    with pytest.raises(ConfigError) as caught:
        load_settings(path, environ=env)
    assert field in str(caught.value)


@pytest.mark.parametrize(
    ("text", "field"),
    [
        ("[server]\ncolour = 'red'\n" + MINIMAL, "server.colour"),
        ("[frobnicate]\nx = 1\n" + MINIMAL, "frobnicate"),
        (MINIMAL + "temperature = 0.5\n", "models.0.temperature"),
    ],
)
def test_unknown_fields_are_rejected(tmp_path: Path, text: str, field: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(write(tmp_path, text), environ={})
    assert field in str(caught.value)
    assert "Extra inputs are not permitted" in str(caught.value)


def test_unknown_field_from_the_environment_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(write(tmp_path, MINIMAL), environ={"PROXY__SERVER__PROT": "9000"})
    assert "server.prot" in str(caught.value)


def test_cross_references_are_checked(tmp_path: Path) -> None:
    text = MINIMAL + '\n[[models]]\nname = "other"\nupstream = "nowhere"\n'
    with pytest.raises(ConfigError) as caught:
        load_settings(write(tmp_path, text), environ={})
    assert "models.1.upstream" in str(caught.value)
    text = MINIMAL + '\n[[models]]\nname = "x"\naliases = ["gpt-4o-mini"]\nupstream = "mock"\n'
    with pytest.raises(ConfigError) as caught:
        load_settings(write(tmp_path, text), environ={})
    assert "models.1" in str(caught.value) and "used twice" in str(caught.value)


def test_toml_syntax_error_names_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, "[server\nport = 1\n")
    with pytest.raises(ConfigError) as caught:
        load_settings(path, environ={})
    assert str(path) in str(caught.value)


def test_a_model_without_a_known_price_is_refused(tmp_path: Path) -> None:
    text = MINIMAL + '\n[[models]]\nname = "in-house-llm-7b"\nupstream = "mock"\n'
    settings = load_settings(write(tmp_path, text), environ={})
    with pytest.raises(ConfigError) as caught:
        build_routes(settings)
    assert "models.1.price" in str(caught.value)
    assert "in-house-llm-7b" in str(caught.value)
    # A configured price, or an explicit default price, makes it acceptable.
    priced = text + "[models.price]\ninput = 1\noutput = 2\n"
    routes = build_routes(load_settings(write(tmp_path, priced), environ={}))
    assert routes["in-house-llm-7b"].price.output_nano_per_m == 2_000_000_000
    defaulted = (
        text + "[metering]\nunknown_price = 'default'\n"
        "[metering.default_price]\ninput = 3\noutput = 4\n"
    )
    routes = build_routes(load_settings(write(tmp_path, defaulted), environ={}))
    assert routes["in-house-llm-7b"].price.source == "default"


def test_default_without_default_price_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(write(tmp_path, "[metering]\nunknown_price = 'default'\n"), environ={})
    assert "metering" in str(caught.value)


def test_unknown_encoding_is_refused_at_build(tmp_path: Path) -> None:
    settings = load_settings(write(tmp_path, MINIMAL + 'encoding = "p50k_nope"\n'), environ={})
    with pytest.raises(ConfigError) as caught:
        build_routes(settings)
    assert "models.0.encoding" in str(caught.value)


def test_the_shipped_default_config_loads_and_prices_every_model() -> None:
    settings = load_settings(DEFAULT_CONFIG_PATH, environ={})
    assert isinstance(settings, Settings)
    assert settings.redis.url == ""  # the embedded default
    assert settings.server.port == 8080
    assert settings.models, "the default config lists models"
    routes = build_routes(settings)
    for model in settings.models:
        provider = settings.upstream(model.choices[0].name).price_provider_id
        if model.is_pattern:  # priced per concrete name: a current Claude model
            assert routes["claude-sonnet-4-5"].price.input_nano_per_m > 0
            continue
        price = resolve_price(model, settings.metering, provider)
        assert price is not None, model.name
        assert price.input_nano_per_m > 0, model.name
        for public in (model.name, *model.aliases):
            assert routes[public].price == price
        if model.kind == "chat":
            assert price.output_nano_per_m > 0, model.name
            assert price.output_nano_per_m >= price.input_nano_per_m, model.name


UPSTREAMS = """
[[upstreams]]
name = "openai"
base_url = "https://api.openai.com/v1"

[[upstreams]]
name = "azure"
base_url = "https://my-resource.openai.azure.com"
kind = "azure"
api_version = "2024-10-21"

[[upstreams]]
name = "anthropic"
base_url = "https://api.anthropic.com"
kind = "anthropic"
"""


def test_a_model_may_list_upstreams_of_one_api_with_optional_weights(tmp_path: Path) -> None:
    text = (
        UPSTREAMS
        + """
[[models]]
name = "gpt-4o"
upstream = ["openai", { name = "azure", weight = 2 }]
deployment = "gpt4o-prod"
"""
    )
    routes = build_routes(load_settings(write(tmp_path, text), environ={}))
    route = routes["gpt-4o"]
    assert [(c.upstream.name, c.model, c.deployment, c.weight) for c in route.upstreams] == [
        ("openai", "gpt-4o", "", None),
        ("azure", "gpt4o-prod", "gpt4o-prod", 2.0),
    ]
    mixed = UPSTREAMS + '[[models]]\nname = "x"\nupstream = ["openai", "anthropic"]\n'
    with pytest.raises(ConfigError) as caught:
        load_settings(write(tmp_path, mixed), environ={})
    assert "models.0.upstream" in str(caught.value) and "Anthropic" in str(caught.value)
    for bad, words in (
        ('upstream = ["openai", "nowhere"]', "unknown upstream 'nowhere'"),
        ('upstream = ["openai", "openai"]', "listed twice"),
        ("upstream = []", "empty"),
    ):
        text = UPSTREAMS + f'[[models]]\nname = "x"\n{bad}\n'
        with pytest.raises(ConfigError) as caught:
            load_settings(write(tmp_path, text), environ={})
        assert words in str(caught.value), bad


def test_patterns_route_many_names_and_keep_their_own_names(tmp_path: Path) -> None:
    text = UPSTREAMS + '[[models]]\nname = "claude-*"\nupstream = "anthropic"\n'
    routes = build_routes(load_settings(write(tmp_path, text), environ={}))
    assert list(routes) == []  # patterns are not listed
    route = routes["claude-sonnet-4-5"]
    assert (route.name, route.upstream_model, route.entry, route.dialect) == (
        "claude-sonnet-4-5",
        "claude-sonnet-4-5",
        "claude-*",
        "anthropic",
    )
    assert route.price.cache_write_nano_per_m == 3_750_000_000
    assert routes.get("gpt-4o") is None
    aliased = UPSTREAMS + '[[models]]\nname = "claude-*"\nupstream = "anthropic"\naliases = ["c"]\n'
    with pytest.raises(ConfigError) as caught:
        load_settings(write(tmp_path, aliased), environ={})
    assert "pattern" in str(caught.value)


def test_a_pattern_match_without_a_price_follows_the_unknown_price_rule(tmp_path: Path) -> None:
    text = UPSTREAMS + '[[models]]\nname = "in-house-*"\nupstream = "openai"\n'
    routes = build_routes(load_settings(write(tmp_path, text), environ={}))
    with pytest.raises(UnpricedModel):
        routes.get("in-house-7b")
    defaulted = text + (
        "[metering]\nunknown_price = 'default'\n[metering.default_price]\ninput = 3\noutput = 4\n"
    )
    routes = build_routes(load_settings(write(tmp_path, defaulted), environ={}))
    assert routes["in-house-7b"].price.source == "default"


def test_the_docs_config_for_the_bundled_mock_loads() -> None:
    """The configuration page shows how to run ``serve`` against ``llm-proxy mock-upstream``."""
    page = (DEFAULT_CONFIG_PATH.parent.parent / "docs" / "configuration.md").read_text()
    snippet = page.split("cat > mock.toml <<'TOML'\n", 1)[1].split("\nTOML\n", 1)[0]
    settings = Settings.model_validate(tomllib.loads(snippet))
    routes = build_routes(settings)
    assert routes["gpt-4o-mini"].upstream.base_url == "http://127.0.0.1:9090/v1"
    assert routes["gpt-4o-mini"].upstream.forward_headers == ["x-mock-*"]
