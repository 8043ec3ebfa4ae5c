"""Settings: what a job file may not choose, base URLs and the targets run keys are bound to."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from runner import config
from runner.config import (
    OPERATOR_ONLY,
    PUBLIC_BASE_URLS,
    Settings,
    normalize_base_url,
    normalize_target,
    resolve_settings,
    target_of,
)
from runner.errors import ConfigError

JOB = "jobs/pay.yaml"


def refused(job: dict[str, object], cli: dict[str, object | None] | None = None, **env: str) -> str:
    with pytest.raises(ConfigError) as caught:
        resolve_settings(cli or {}, job_settings=job, env=env, job_file=JOB)
    return str(caught.value)


class TestOperatorOnly:
    def test_the_tuple(self) -> None:
        """The settings a job file may not choose, by name."""
        assert set(OPERATOR_ONLY) == {
            "base_url", "metrics_file", "ledger", "output", "apply_grace", "notify",
            "by", "allow_repeat_of", "yes",  # who runs it, what it may repeat, no question
            "repeat_window",  # a job of last month's rows must not switch its own guard off
        }  # fmt: skip
        assert "provider" not in OPERATOR_ONLY
        assert "run_key" not in OPERATOR_ONLY

    @pytest.mark.parametrize(
        ("name", "value", "flag", "env"),
        [
            ("base_url", "http://127.0.0.1:9/api", "--base-url", "TOPUP_BASE_URL"),
            ("metrics_file", "/etc/passwd", "--metrics-file", "TOPUP_METRICS_FILE"),
            ("ledger", "fresh.sqlite", "--ledger", "TOPUP_LEDGER"),
            ("output", "out.xlsx", "--output", "TOPUP_OUTPUT"),
            ("apply_grace", 0, "--apply-grace", "TOPUP_APPLY_GRACE"),
            ("repeat_window", 0, "--repeat-window", "TOPUP_REPEAT_WINDOW"),
        ],
    )
    def test_refused_from_a_job_file(self, name: str, value: object, flag: str, env: str) -> None:
        """Each is refused, naming the setting, the flag and the variable to use instead."""
        message = refused({name: value}, {"provider": "uncash"})
        assert f"settings.{name}" in message
        assert flag in message
        assert env in message
        assert JOB in message

    def test_refused_when_the_operator_chose_otherwise(self) -> None:
        """A job's base URL that differs from the operator's is refused, not silently beaten."""
        message = refused({"base_url": "http://127.0.0.1:9/"}, {"base_url": "http://127.0.0.1:8/"})
        assert "settings.base_url" in message

    def test_base_url_equal_to_the_operators_is_accepted(self) -> None:
        """The same URL spelled differently (normalised) is no conflict."""
        got = resolve_settings(
            {"provider": "uncash"},
            job_settings={"base_url": "HTTP://localhost:8080/api/"},
            env={"TOPUP_BASE_URL": "http://127.0.0.1:8080/api"},
        )
        assert got.base_url == "http://127.0.0.1:8080/api"

    def test_paths_equal_once_resolved_are_accepted(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A relative path and the absolute one it resolves to are the same file."""
        monkeypatch.chdir(tmp_path)
        got = resolve_settings(
            {"output": str(tmp_path / "out.csv"), "ledger": str(tmp_path / "l.sqlite")},
            job_settings={"output": "./out.csv", "ledger": "sub/../l.sqlite"},
            env={},
        )
        assert got.output == tmp_path / "out.csv"

    def test_apply_grace_equal_to_the_operators(self) -> None:
        """The same number of seconds from both is accepted."""
        got = resolve_settings(
            {}, job_settings={"apply_grace": "45"}, env={"TOPUP_APPLY_GRACE": "45.0"}
        )
        assert got.apply_grace == 45.0

    def test_provider_and_run_key_stay_allowed(self) -> None:
        """The contract lets a job name its provider and run key."""
        got = resolve_settings(
            {}, job_settings={"rate_limit": 2}, job_provider="uncash", job_run_key="k", env={}
        )
        assert (got.provider, got.run_key, got.rate_limit) == ("uncash", "k", 2.0)

    def test_null_is_not_a_choice(self) -> None:
        """`ledger: null` in a job file chooses nothing and is ignored."""
        assert resolve_settings({}, job_settings={"ledger": None}, env={}).ledger is None


class TestApplyGrace:
    def test_default(self) -> None:
        """Thirty seconds unless the operator says otherwise."""
        assert Settings().apply_grace == 30.0
        assert resolve_settings({}, env={}).apply_grace == 30.0

    def test_from_flag_and_environment(self) -> None:
        """--apply-grace beats TOPUP_APPLY_GRACE."""
        assert resolve_settings({}, env={"TOPUP_APPLY_GRACE": "5"}).apply_grace == 5.0
        both = resolve_settings({"apply_grace": "0"}, env={"TOPUP_APPLY_GRACE": "5"})
        assert both.apply_grace == 0.0

    @pytest.mark.parametrize("value", ["-1", "nan", "inf", "soon"])
    def test_invalid(self, value: str) -> None:
        """Negative, infinite or non-numbers are configuration errors."""
        with pytest.raises(ConfigError, match=r"apply-grace|apply_grace"):
            resolve_settings({"apply_grace": value}, env={})


class TestBaseUrlRefused:
    @pytest.mark.parametrize(
        "url",
        [
            "https://user:s3cr3tpass@api.example.com/v1",
            "https://s3cr3tpass@api.example.com/v1",
            "https://:s3cr3tpass@api.example.com",
        ],
    )
    def test_userinfo_is_refused_without_echo(self, url: str) -> None:
        """A password in the URL is refused and never shown."""
        with pytest.raises(ConfigError) as caught:
            Settings(provider="uncash", base_url=url)
        message = str(caught.value)
        assert "s3cr3tpass" not in message
        assert "api.example.com" not in message
        assert "password" in message

    @pytest.mark.parametrize(
        "url",
        [
            "https://api.example.com/v1?token=s3cr3tpass",
            "https://api.example.com/v1#s3cr3tpass",
            "https://api.example.com/v1?",
        ],
    )
    def test_query_or_fragment(self, url: str) -> None:
        """A query or fragment is refused, its content not shown."""
        with pytest.raises(ConfigError) as caught:
            Settings(provider="uncash", base_url=url)
        assert "s3cr3tpass" not in str(caught.value)
        assert "query" in str(caught.value)

    @pytest.mark.parametrize(
        "url",
        [
            "ftp://api.example.com",
            "file:///etc/passwd",
            "api.example.com/v1",
            "https://api.exa mple.com",
            "https://api.example.com/v\t1",
            "https://api.example.com/v1\n",
            "https://api.example.com/\x00",
            "https://api.example.com/\u200bv1",
            "https://",
            "https://api.example.com:0/",
            "https://api.example.com:99999/",
            "https://api.example.com:port/",
            "https://api.example.com/%zz",
            "http://1.2.3.999/",
            "http://[::g]/",
        ],
    )
    def test_malformed(self, url: str) -> None:
        """Anything but a plain http(s) URL with a host is a configuration error."""
        with pytest.raises(ConfigError, match="base-url"):
            normalize_base_url(url)
        with pytest.raises(ConfigError):
            Settings(provider="uncash", base_url=url)

    def test_job_file_base_url_with_password_is_not_echoed(self) -> None:
        """Even refused as operator-only, a job's URL is not shown."""
        message = refused({"base_url": "https://u:s3cr3tpass@h/"})
        assert "s3cr3tpass" not in message


class TestNormalizeBaseUrl:
    @pytest.mark.parametrize(
        ("url", "expected"),
        [
            ("HTTPS://API.Example.COM/api/v1/", "https://api.example.com/api/v1"),
            ("https://api.example.com:443/api/v1", "https://api.example.com/api/v1"),
            ("http://api.example.com:80", "http://api.example.com"),
            ("http://api.example.com:0080/", "http://api.example.com"),
            ("https://api.example.com:80/", "https://api.example.com:80"),
            ("https://api.example.com//api///v1//", "https://api.example.com/api/v1"),
            ("https://api.example.com/a/./b/../c", "https://api.example.com/a/c"),
            ("https://api.example.com/%61pi/%7e%2fx", "https://api.example.com/api/~%2Fx"),
            ("https://api.example.com/%2E%2E/v1", "https://api.example.com/v1"),
            ("https://bücher.example/v1", "https://xn--bcher-kva.example/v1"),
            ("https://api.example.com./v1", "https://api.example.com/v1"),
            ("https://api.example.com/é", "https://api.example.com/%C3%A9"),
            ("http://[2001:DB8:0::1]:8080/", "http://[2001:db8::1]:8080"),
        ],
    )
    def test_examples(self, url: str, expected: str) -> None:
        """Case, default ports, slashes, dot segments, escapes and IDNA are normalised."""
        assert normalize_base_url(url) == expected

    @pytest.mark.parametrize(
        "host",
        [
            "localhost",
            "LOCALHOST",
            "localhost.",
            "127.0.0.1",
            "127.1",
            "127.0.1",
            "2130706433",
            "0x7f.0.0.1",
            "0x7F000001",
            "0177.0.0.1",
            "127.255.255.254",
            "0.0.0.0",
            "0",
            "[::1]",
            "[0:0:0:0:0:0:0:1]",
            "[::ffff:127.0.0.1]",
            "[::ffff:7f00:1]",
            "[::]",
        ],
    )
    def test_loopback_spellings_are_one_target(self, host: str) -> None:
        """Every spelling of this machine, on one port, is the same target."""
        assert normalize_base_url(f"http://{host}:8080/api/") == "http://127.0.0.1:8080/api"

    def test_other_ipv4_spellings(self) -> None:
        """inet_aton spellings of other addresses normalise to dotted quads."""
        assert normalize_base_url("http://0xC0.0250.1.1") == "http://192.168.1.1"
        assert normalize_base_url("http://3232235777/") == "http://192.168.1.1"

    def test_idempotent_on_the_public_urls(self) -> None:
        """The public URLs are already in normal form."""
        for url in PUBLIC_BASE_URLS.values():
            assert normalize_base_url(url) == url

    def test_public_urls_match_the_adapters(self) -> None:
        """config.py cannot import the adapters; the URLs it names must be theirs."""
        from runner.providers import uncash

        assert PUBLIC_BASE_URLS["uncash"] == uncash.PUBLIC_BASE_URL


_LABEL = st.from_regex(r"[a-z][a-z0-9]{0,10}", fullmatch=True)
_HOST = st.lists(_LABEL, min_size=2, max_size=3).map(".".join)
_SEGMENT = st.from_regex(r"[A-Za-z0-9_~-]{1,8}", fullmatch=True)
_PATH = st.lists(_SEGMENT, max_size=4).map(lambda parts: "".join("/" + p for p in parts))
_PORT = st.integers(min_value=1, max_value=65535)


def _respell(host: str, path: str, port: int, scheme: str, data: st.DataObject) -> str:
    """An equivalent spelling of scheme://host:port/path."""
    default = {"http": 80, "https": 443}[scheme]
    shown_scheme = data.draw(st.sampled_from([scheme, scheme.upper(), scheme.title()]))
    shown_host = "".join(c.upper() if data.draw(st.booleans()) else c for c in host)
    if data.draw(st.booleans()):
        shown_host += "."
    if port == default:
        shown_port = data.draw(st.sampled_from(["", f":{port}", f":0{port}"]))
    else:
        shown_port = data.draw(st.sampled_from([f":{port}", f":0{port}"]))
    shown_path = ""
    for segment in path.split("/")[1:]:
        slashes = "/" * data.draw(st.integers(min_value=1, max_value=3))
        escaped = "".join(
            f"%{ord(c):02{data.draw(st.sampled_from(['x', 'X']))}}"
            if data.draw(st.booleans())
            else c
            for c in segment
        )
        shown_path += slashes + escaped
        if data.draw(st.booleans()):
            shown_path += "/./"
        if data.draw(st.booleans()):
            shown_path += "/zz/.."
    shown_path += data.draw(st.sampled_from(["", "/", "//"]))
    return f"{shown_scheme}://{shown_host}{shown_port}{shown_path}"


class TestNormalizeProperties:
    @given(_HOST, _PATH, _PORT, st.sampled_from(["http", "https"]), st.data())
    @settings(max_examples=200, deadline=None)
    def test_equivalent_spellings_are_equal(
        self, host: str, path: str, port: int, scheme: str, data: st.DataObject
    ) -> None:
        """Case, trailing dots, default ports, zero-padded ports, escapes, dots and slashes."""
        canonical = normalize_base_url(f"{scheme}://{host}:{port}{path}")
        assert normalize_base_url(_respell(host, path, port, scheme, data)) == canonical
        assert normalize_base_url(canonical) == canonical

    @given(st.integers(min_value=0x7F000000, max_value=0x7FFFFFFF), _PORT)
    @settings(max_examples=100, deadline=None)
    def test_any_loopback_address_in_any_form(self, address: int, port: int) -> None:
        """Every 127/8 address, written as one number, in hex, or dotted, is one target."""
        dotted = str(ipaddress.IPv4Address(address))
        expected = normalize_base_url(f"http://localhost:{port}")
        for host in (str(address), hex(address), dotted, f"[::ffff:{dotted}]"):
            assert normalize_base_url(f"http://{host}:{port}") == expected

    @given(_HOST, _HOST, _PATH, _PATH, _PORT, _PORT)
    @settings(max_examples=200, deadline=None)
    def test_distinct_targets_stay_distinct(
        self, host_a: str, host_b: str, path_a: str, path_b: str, port_a: int, port_b: int
    ) -> None:
        """Different hosts, ports or paths never normalise to the same URL."""
        assume((host_a, path_a, port_a) != (host_b, path_b, port_b))
        a = normalize_base_url(f"https://{host_a}:{port_a}{path_a}")
        b = normalize_base_url(f"https://{host_b}:{port_b}{path_b}")
        assert a != b

    @given(st.ip_addresses(v=4), st.ip_addresses(v=4))
    @settings(max_examples=100, deadline=None)
    def test_distinct_addresses_stay_distinct(
        self, a: ipaddress.IPv4Address, b: ipaddress.IPv4Address
    ) -> None:
        """Two addresses outside loopback (and 0.0.0.0) stay two targets."""
        local = ipaddress.IPv4Network("127.0.0.0/8")
        assume(a != b and not {a, b} & {ipaddress.IPv4Address(0)})
        assume(a not in local and b not in local)
        assert normalize_base_url(f"http://{a}") != normalize_base_url(f"http://{b}")


class TestTargets:
    def test_sandbox(self) -> None:
        """The built-in sandbox is one target, whatever URL it got."""
        assert target_of("sandbox", None) == "sandbox:in-process"
        assert target_of("sandbox", "http://127.0.0.1:1") == "sandbox:in-process"

    def test_no_url_is_the_public_url(self) -> None:
        """No base URL and the public URL, however written, are one target."""
        public = target_of("uncash", None)
        assert public == "uncash:https://api.uncash.io/api/v1"
        assert target_of("uncash", "HTTPS://api.uncash.io:443/api/v1/") == public

    def test_providers_are_distinct(self) -> None:
        """The same URL for two providers is two targets."""
        assert target_of("uncash", "http://127.0.0.1:9") != target_of("alix", "http://127.0.0.1:9")

    def test_alix_has_no_public_url(self) -> None:
        """Alix publishes no API root: without a base URL there is no target."""
        with pytest.raises(ConfigError, match="base-url"):
            target_of("alix", None)

    @pytest.mark.parametrize(
        ("stored", "expected"),
        [
            ("sandbox:in-process", "sandbox:in-process"),
            ("uncash:default", "uncash:https://api.uncash.io/api/v1"),
            ("uncash:https://api.uncash.io/api/v1/", "uncash:https://api.uncash.io/api/v1"),
            ("uncash:http://localhost:8080/", "uncash:http://127.0.0.1:8080"),
            ("alix:http://127.1:9/api/v2/", "alix:http://127.0.0.1:9/api/v2"),
            ("alix:default", "alix:default"),
            ("uncash:not a url", "uncash:not a url"),
            ("nonsense", "nonsense"),
            ("other:http://x", "other:http://x"),
        ],
    )
    def test_normalize_stored_targets(self, stored: str, expected: str) -> None:
        """Targets written by earlier versions read as today's; unreadable ones unchanged."""
        assert normalize_target(stored) == expected

    def test_normalize_target_is_idempotent(self) -> None:
        """A target already in today's form is left as it is."""
        for target in (target_of("uncash", None), target_of("alix", "http://[::1]:5/x")):
            assert normalize_target(target) == target


def test_config_imports_no_adapter() -> None:
    """config.py stays free of aiohttp and the provider modules."""
    source = Path(config.__file__).read_text()
    assert "aiohttp" not in source
    assert "runner.providers" not in source


NUMERIC_OPTIONS = (
    "--rate-limit",
    "--cooldown",
    "--concurrency",
    "--max-attempts",
    "--timeout",
    "--wait-settle",
    "--lease",
    "--apply-grace",
    "--fee-rate",
)
EXAMPLE_JOB = Path(__file__).resolve().parent.parent / "jobs" / "payroll-2026-11.csv"


def help_text(command: str) -> str:
    from click.testing import CliRunner

    from runner.cli import main

    done = CliRunner().invoke(main, [command, "--help"], terminal_width=80)
    assert done.exit_code == 0
    return done.output


class TestHelp:
    @pytest.mark.parametrize("command", ["run", "check"])
    def test_numeric_options_are_typed_not_text(self, command: str) -> None:
        """No numeric option of run or check is shown as TEXT: each names its unit."""
        lines = help_text(command).splitlines()
        for option in NUMERIC_OPTIONS:
            line = next(line for line in lines if line.strip().startswith(option + " "))
            assert "TEXT" not in line, line
        assert "TEXT" not in "".join(lines)

    @pytest.mark.parametrize("command", ["run", "check"])
    def test_built_in_defaults_are_shown(self, command: str) -> None:
        """Every numeric option shows its built-in default, per provider where they differ."""
        text = " ".join(help_text(command).split())
        for shown in (
            "[default: 2 sandbox, 120 uncash, 0 alix]",  # cooldown
            "[default: 20 sandbox, 5 uncash, 5 alix]",  # rate limit
            "[default: 8 sandbox, 4 uncash, 4 alix]",  # concurrency
            "[default: 5]",  # max attempts
            "[default: 30]",  # timeout, apply grace
            "[default: 0]",  # wait settle
            "[default: 15]",  # lease
            "[default: sandbox]",  # provider
        ):
            assert shown in text, shown
        for option in NUMERIC_OPTIONS:
            block = text.split(f" {option} ", 1)[1].split(" --", 1)[0]
            assert "[default: " in block, option

    def test_help_fits_80_columns(self) -> None:
        """run --help stays readable in an 80-column terminal."""
        assert max(len(line) for line in help_text("run").splitlines()) <= 80

    @pytest.mark.parametrize("command", ["run", "check"])
    @pytest.mark.parametrize("option", NUMERIC_OPTIONS)
    @pytest.mark.parametrize("garbage", ["abc", "nan", "-5", "1e999999", "1,5", ""])
    def test_garbage_is_one_line_and_exit_2(self, command: str, option: str, garbage: str) -> None:
        """Garbage for a numeric option is refused in one line with exit 2, naming the option."""
        from click.testing import CliRunner

        from runner.cli import main

        args = [command, str(EXAMPLE_JOB), option, garbage]
        done = CliRunner().invoke(main, args, env={"TOPUP_LOG_FORMAT": "console"})
        assert done.exit_code == 2, (option, garbage, done.output)
        lines = [line for line in done.output.splitlines() if line.strip()]
        assert len(lines) == 1, lines
        assert option.lstrip("-") in lines[0] or option.lstrip("-").replace("-", "_") in lines[0]
