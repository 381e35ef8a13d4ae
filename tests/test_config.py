"""
Tests for L{vaporproxy.config}.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import textwrap

from twisted.trial.unittest import SynchronousTestCase

from vaporproxy.config import (
    RecordingConfig,
    StepUpPolicy,
    ApiKey,
    Config,
    ConfigError,
    ConsoleConfig,
    HypervisorConfig,
    JWTConfig,
    VncTLSConfig,
    load_config,
    parse_config,
    with_listen,
)

HASH = hashlib.sha256(b"test-key").hexdigest()
HASH2 = hashlib.sha256(b"other-key").hexdigest()
EXAMPLE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "vapor.conf")

#: The console section of the original API document, verbatim.
ORIGINAL_CONSOLE = """
console:
  max_connections_per_vm: 5
  max_total_connections: 100
  token_ttl: "5m"
  connection_timeout: "30s"
  idle_timeout: "10m"
  allowed_hosts:
    - "localhost"
    - "127.0.0.1"
    - "192.168.1.0/24"
  enable_tls: false
  buffer_size: 32  # in KB
  cleanup_interval: "1m"
"""


def parse(text: str) -> Config:
    return parse_config(textwrap.dedent(text))


class ConfigTestMixin:
    def assertConfigError(self, text: str, message: str) -> None:
        """
        Parsing C{text} fails with exactly C{message}, on one line.
        """
        error = self.assertRaises(ConfigError, parse, text)
        self.assertEqual(str(error), message)
        self.assertNotIn("\n", str(error))


class DefaultsTests(SynchronousTestCase):
    def test_emptyDocument(self) -> None:
        """
        When the file is empty, every value is the default.
        """
        self.assertEqual(parse_config(""), Config())
        self.assertEqual(parse_config("# only a comment\n"), Config())

    def test_emptySections(self) -> None:
        """
        When sections are present but empty, every value is the default.
        """
        text = "console:\nserver:\nauth:\ntokens:\nlogging:\n"
        self.assertEqual(parse_config(text), Config())

    def test_originalDefaults(self) -> None:
        """
        When nothing is configured, the console values are the original document's defaults.
        """
        c = Config().console
        self.assertEqual(
            (c.max_connections_per_vm, c.max_total_connections, c.token_ttl),
            (5, 100, 300.0),
        )
        self.assertEqual((c.connection_timeout, c.idle_timeout, c.cleanup_interval), (30.0, 600.0, 60.0))
        self.assertEqual((c.enable_tls, c.buffer_size), (False, 32 * 1024))
        self.assertEqual(c.allowed_hosts, ("localhost", "127.0.0.1", "::1"))

    def test_originalDocument(self) -> None:
        """
        When the original document's console section is given, it parses to its defaults plus its 192.168.1.0/24.
        """
        config = parse_config(ORIGINAL_CONSOLE)
        expected = dataclasses.replace(
            ConsoleConfig(), allowed_hosts=("localhost", "127.0.0.1", "192.168.1.0/24")
        )
        self.assertEqual(config.console, expected)

    def test_exampleFile(self) -> None:
        """
        When the repository's documented vapor.conf is loaded, it equals the defaults.
        """
        self.assertEqual(load_config(EXAMPLE), Config())


class ConsoleTests(ConfigTestMixin, SynchronousTestCase):
    def test_durations(self) -> None:
        """
        When durations are given as ms, s, m, h or bare seconds, they become seconds.
        """
        config = parse(
            """
            console:
              token_ttl: 500ms
              connection_timeout: 30s
              idle_timeout: 1h
              cleanup_interval: 90
            """
        )
        self.assertEqual(config.console.token_ttl, 0.5)
        self.assertEqual(config.console.connection_timeout, 30.0)
        self.assertEqual(config.console.idle_timeout, 3600.0)
        self.assertEqual(config.console.cleanup_interval, 90.0)
        self.assertEqual(parse("console: {token_ttl: 1.5m}").console.token_ttl, 90.0)

    def test_badDuration(self) -> None:
        """
        When a duration is not one, the error names the key, the value and the expected form.
        """
        self.assertConfigError(
            "console: {token_ttl: 5 minutes}",
            "console.token_ttl: '5 minutes' is not a duration (expected e.g. 500ms, 30s, 5m, 1h)",
        )
        self.assertConfigError(
            "console: {idle_timeout: true}",
            "console.idle_timeout: True is not a duration (expected e.g. 500ms, 30s, 5m, 1h)",
        )
        self.assertConfigError(
            "console: {cleanup_interval: 0s}",
            "console.cleanup_interval: '0s' is not a positive duration (expected e.g. 500ms, 30s, 5m, 1h)",
        )

    def test_limits(self) -> None:
        """
        When limits are positive integers they are kept; zero, negatives and strings are errors.
        """
        config = parse("console: {max_connections_per_vm: 2, max_total_connections: 7}")
        self.assertEqual((config.console.max_connections_per_vm, config.console.max_total_connections), (2, 7))
        self.assertConfigError(
            "console: {max_connections_per_vm: 0}",
            "console.max_connections_per_vm: 0 is not a valid integer (expected an integer >= 1)",
        )
        self.assertConfigError(
            "console: {max_total_connections: '10'}",
            "console.max_total_connections: '10' is not a valid integer (expected an integer >= 1)",
        )

    def test_bufferSize(self) -> None:
        """
        When buffer_size is given in KB it is stored in bytes; non-positive values are errors.
        """
        self.assertEqual(parse("console: {buffer_size: 64}").console.buffer_size, 65536)
        self.assertConfigError(
            "console: {buffer_size: -1}",
            "console.buffer_size: -1 is not a valid integer (expected an integer >= 1)",
        )

    def test_maxMessageSize(self) -> None:
        """
        When max_message_size is bytes or KB/MB it is stored in bytes; other text is an error.
        """
        self.assertEqual(parse("console: {max_message_size: 4096}").console.max_message_size, 4096)
        self.assertEqual(parse("console: {max_message_size: 64KB}").console.max_message_size, 65536)
        self.assertEqual(parse("console: {max_message_size: 2MB}").console.max_message_size, 2 << 20)
        self.assertConfigError(
            "console: {max_message_size: lots}",
            "console.max_message_size: 'lots' is not a size (expected bytes as an integer, or e.g. 64KB, 1MB)",
        )

    def test_booleans(self) -> None:
        """
        When booleans are true/false they are kept; other values are errors.
        """
        config = parse("console: {bind_client_ip: true}")
        self.assertTrue(config.console.bind_client_ip)
        self.assertConfigError(
            "console: {bind_client_ip: 'yes please'}",
            "console.bind_client_ip: 'yes please' is not a boolean (expected true or false)",
        )

    def test_allowedHosts(self) -> None:
        """
        When allowed_hosts holds names, IPv4, IPv6 and CIDRs, they are kept (normalised).
        """
        config = parse(
            """
            console:
              allowed_hosts: [Console.Example.COM, 10.1.2.3, "::1", 192.168.1.0/24, "fd00::/8"]
            """
        )
        self.assertEqual(
            config.console.allowed_hosts,
            ("console.example.com", "10.1.2.3", "::1", "192.168.1.0/24", "fd00::/8"),
        )

    def test_badAllowedHosts(self) -> None:
        """
        When an allowed_hosts entry is not a name, address or CIDR, the error names its index.
        """
        expected = "expected a host name, an IP address or a CIDR such as 192.168.1.0/24"
        self.assertConfigError(
            "console: {allowed_hosts: [localhost, 'bad host!']}",
            f"console.allowed_hosts[1]: 'bad host!' is not a host or network ({expected})",
        )
        self.assertConfigError(
            "console: {allowed_hosts: [10.0.0.256]}",
            f"console.allowed_hosts[0]: '10.0.0.256' is not a host or network ({expected})",
        )
        self.assertConfigError(
            "console: {allowed_hosts: [192.168.1.5/24]}",
            f"console.allowed_hosts[0]: '192.168.1.5/24' is not a network ({expected}; host bits must be zero)",
        )
        self.assertConfigError(
            "console: {allowed_hosts: []}",
            "console.allowed_hosts: [] is not a non-empty list (expected at least one entry)",
        )
        self.assertConfigError(
            "console: {allowed_hosts: localhost}",
            "console.allowed_hosts: 'localhost' is not a list (expected a YAML list, e.g. [a, b])",
        )

    def test_enableTlsNeedsSslEndpoint(self) -> None:
        """
        When enable_tls is true and no ssl: endpoint listens, the error says what is needed.
        """
        self.assertConfigError(
            "console: {enable_tls: true}",
            "console.enable_tls: True needs an ssl: endpoint in server.listen"
            " (expected e.g. ssl:8443:privateKey=key.pem:certKey=cert.pem, or enable_tls: false)",
        )


class ServerTests(ConfigTestMixin, SynchronousTestCase):
    def test_listen(self) -> None:
        """
        When listen holds valid endpoint strings, they are kept as given.
        """
        config = parse(
            """
            server:
              listen: ["tcp:8080:interface=127.0.0.1", "tcp6:8081:interface=\\\\:\\\\:1", "unix:/tmp/vapor.sock"]
            """
        )
        self.assertEqual(
            config.server.listen,
            ("tcp:8080:interface=127.0.0.1", "tcp6:8081:interface=\\:\\:1", "unix:/tmp/vapor.sock"),
        )

    def test_badListen(self) -> None:
        """
        When an endpoint string is unknown or its port is out of range, the error names it.
        """
        expected = "expected a Twisted endpoint such as tcp:8080:interface=127.0.0.1"
        self.assertConfigError(
            "server: {listen: ['nope:1']}",
            f"server.listen[0]: 'nope:1' is not a valid endpoint ({expected}; Unknown endpoint type: 'nope')",
        )
        self.assertConfigError(
            "server: {listen: ['tcp:70000']}",
            f"server.listen[0]: 'tcp:70000' is not a valid endpoint ({expected}; the port must be 0-65535)",
        )
        self.assertConfigError(
            "server: {listen: []}",
            "server.listen: [] is not a non-empty list (expected at least one entry)",
        )

    def test_sslListenNeedsFiles(self) -> None:
        """
        When an ssl: endpoint names a missing key file, the error names the file.
        """
        missing = os.path.abspath(self.mktemp())
        self.assertConfigError(
            f"server: {{listen: ['ssl:8443:privateKey={missing}']}}",
            f"server.listen[0]: 'ssl:8443:privateKey={missing}' is not a usable TLS endpoint"
            f" (file '{missing}' does not exist)",
        )

    def test_sslListenWithTls(self) -> None:
        """
        When an ssl: endpoint has a real key and certificate, enable_tls is accepted.
        """
        pem = _self_signed_pem(self.mktemp())
        config = parse(f"console: {{enable_tls: true}}\nserver: {{listen: ['ssl:8443:privateKey={pem}']}}")
        self.assertTrue(config.console.enable_tls)
        self.assertEqual(config.server.listen, (f"ssl:8443:privateKey={pem}",))

    def test_origins(self) -> None:
        """
        When allowed_origins holds http(s) origins, they are kept with a lower-case host.
        """
        config = parse("server: {allowed_origins: ['https://Example.com', 'http://a.example:8080/']}")
        self.assertEqual(config.server.allowed_origins, ("https://example.com", "http://a.example:8080"))
        expected = "expected an origin such as https://example.com"
        for bad in ("example.com", "https://example.com/path", "ftp://example.com", "https://x:99999"):
            self.assertConfigError(
                f"server: {{allowed_origins: ['{bad}']}}",
                f"server.allowed_origins[0]: {bad!r} is not an origin ({expected})",
            )

    def test_trustedProxies(self) -> None:
        """
        When trusted_proxies holds IPs and CIDRs they are kept; a host name is an error.
        """
        config = parse("server: {trusted_proxies: [10.0.0.1, 10.0.0.0/8, '::1']}")
        self.assertEqual(config.server.trusted_proxies, ("10.0.0.1", "10.0.0.0/8", "::1"))
        self.assertConfigError(
            "server: {trusted_proxies: [proxy.example]}",
            "server.trusted_proxies[0]: 'proxy.example' is not an IP address or network"
            " (expected an IP address or a CIDR such as 10.0.0.0/8)",
        )

    def test_workers(self) -> None:
        """
        When workers > 1 the redis backend is required, and the error says why.
        """
        config = parse("server: {workers: 4}\ntokens: {backend: redis}")
        self.assertEqual(config.server.workers, 4)
        self.assertConfigError(
            "server: {workers: 2}",
            "server.workers: 2 needs tokens.backend: redis (expected 1 with the memory backend:"
            " tokens and connection limits must be shared between worker processes, use redis)",
        )
        self.assertConfigError(
            "server: {workers: 0}",
            "server.workers: 0 is not a valid integer (expected an integer >= 1)",
        )

    def test_withListen(self) -> None:
        """
        When --listen endpoints are given they replace server.listen and are validated.
        """
        config = with_listen(Config(), ["tcp:9000"])
        self.assertEqual(config.server.listen, ("tcp:9000",))
        config = Config()
        self.assertIs(with_listen(config, []), config)
        error = self.assertRaises(ConfigError, with_listen, Config(), ["tcp:1", "bogus:1"])
        self.assertTrue(str(error).startswith("--listen[1]: 'bogus:1' is not a valid endpoint"))


class AuthTests(ConfigTestMixin, SynchronousTestCase):
    def test_apiKeys(self) -> None:
        """
        When api_keys are complete they parse, with vms defaulting to all and admin to false.
        """
        config = parse(
            f"""
            auth:
              api_keys:
                - {{user: alice, sha256: "{HASH}"}}
                - {{user: bob, sha256: "{HASH2}", vms: ["web-*", "db1"], admin: true}}
            """
        )
        self.assertEqual(
            config.auth.api_keys,
            (ApiKey("alice", HASH), ApiKey("bob", HASH2, ("web-*", "db1"), True)),
        )

    def test_badHashHidden(self) -> None:
        """
        When a sha256 is malformed, the error names the key and never echoes the value.
        """
        bad = HASH.upper()
        error = self.assertRaises(
            ConfigError, parse, f"auth: {{api_keys: [{{user: a, sha256: '{bad}'}}]}}"
        )
        self.assertEqual(
            str(error),
            "auth.api_keys[0].sha256: <hidden> is not a SHA-256"
            " (expected 64 lower-case hex characters, e.g. from sha256sum)",
        )
        self.assertNotIn(bad, str(error))
        self.assertNotIn(bad.lower(), str(error))

    def test_duplicateHashHidden(self) -> None:
        """
        When two keys have the same sha256, the error names both without the value.
        """
        error = self.assertRaises(
            ConfigError,
            parse,
            f"auth: {{api_keys: [{{user: a, sha256: '{HASH}'}}, {{user: b, sha256: '{HASH}'}}]}}",
        )
        self.assertEqual(
            str(error),
            "auth.api_keys[1].sha256: <hidden> is a duplicate of auth.api_keys[0].sha256"
            " (expected every key to be different)",
        )

    def test_apiKeyFields(self) -> None:
        """
        When a key lacks its user, has an empty vms list or an unknown field, the error names it.
        """
        self.assertConfigError(
            f"auth: {{api_keys: [{{sha256: '{HASH}'}}]}}",
            "auth.api_keys[0].user: missing (expected a value)",
        )
        self.assertConfigError(
            f"auth: {{api_keys: [{{user: '', sha256: '{HASH}'}}]}}",
            "auth.api_keys[0].user: '' is not a non-empty string (expected a non-empty string)",
        )
        self.assertConfigError(
            f"auth: {{api_keys: [{{user: a, sha256: '{HASH}', vms: []}}]}}",
            "auth.api_keys[0].vms: [] is not a non-empty list (expected at least one entry)",
        )
        self.assertConfigError(
            f"auth: {{api_keys: [{{user: a, sha256: '{HASH}', admin: 1}}]}}",
            "auth.api_keys[0].admin: 1 is not a boolean (expected true or false)",
        )
        self.assertConfigError(
            f"auth: {{api_keys: [{{user: a, sha256: '{HASH}', key: x}}]}}",
            "auth.api_keys[0].key: unknown key (expected one of: user, sha256, vms, admin)",
        )

    def test_jwt(self) -> None:
        """
        When jwt is null it is off; when it is a complete mapping it parses.
        """
        self.assertIsNone(parse("auth: {jwt: null}").auth.jwt)
        key_file = self.mktemp()
        with open(key_file, "w") as f:
            f.write("secret")
        config = parse(
            f"""
            auth:
              jwt: {{algorithms: [RS256, ES256], key_file: "{key_file}", issuer: https://sso, require_mfa: true}}
            """
        )
        self.assertEqual(
            config.auth.jwt, JWTConfig(("RS256", "ES256"), key_file, "https://sso", None, True)
        )

    def test_badJwt(self) -> None:
        """
        When jwt has a bad algorithm, a missing key file or no algorithms, the error names the key.
        """
        key_file = self.mktemp()
        self.assertConfigError(
            f"auth: {{jwt: {{algorithms: [none], key_file: '{key_file}'}}}}",
            "auth.jwt.algorithms[0]: 'none' is not a JWT algorithm (expected one of HS256, HS384,"
            " HS512, RS256, RS384, RS512, PS256, PS384, PS512, ES256, ES384, ES512, EdDSA)",
        )
        self.assertConfigError(
            f"auth: {{jwt: {{algorithms: [RS256], key_file: '{key_file}'}}}}",
            f"auth.jwt.key_file: {key_file!r} is not a readable file (expected the path of an existing key file)",
        )
        self.assertConfigError(
            "auth: {jwt: {key_file: x}}",
            "auth.jwt.algorithms: missing (expected a value)",
        )
        self.assertConfigError(
            "auth: {jwt: yes}",
            "auth.jwt: True is not a mapping (expected keys: algorithms, key_file, issuer, audience, require_mfa)",
        )


class HypervisorsTests(ConfigTestMixin, SynchronousTestCase):
    def test_hypervisors(self) -> None:
        """
        When hypervisors are listed, they are kept in order with their console hosts.
        """
        config = parse(
            """
            hypervisors:
              - uri: "qemu+ssh://root@kvm1/system"
                console_host: 10.0.0.5
              - {uri: "test:///default"}
            """
        )
        self.assertEqual(
            config.hypervisors,
            (HypervisorConfig("qemu+ssh://root@kvm1/system", "10.0.0.5"), HypervisorConfig("test:///default")),
        )

    def test_badHypervisors(self) -> None:
        """
        When hypervisors is empty or an entry is bad, the error names the entry.
        """
        self.assertConfigError(
            "hypervisors: []", "hypervisors: [] is not a non-empty list (expected at least one entry)"
        )
        self.assertConfigError(
            "hypervisors: [{uri: qemu}]",
            "hypervisors[0].uri: 'qemu' is not a libvirt URI (expected a libvirt URI such as qemu:///system)",
        )
        self.assertConfigError(
            "hypervisors: [{console_host: 10.0.0.1}]", "hypervisors[0].uri: missing (expected a value)"
        )
        self.assertConfigError(
            "hypervisors: [{uri: 'test:///default', console_host: '10.0.0.0/8'}]",
            "hypervisors[0].console_host: '10.0.0.0/8' is not a host"
            " (expected a host name, an IPv4 or an IPv6 address)",
        )


class VncTLSTests(ConfigTestMixin, SynchronousTestCase):
    def setUp(self) -> None:
        self.dir = self.mktemp()
        os.makedirs(self.dir)
        self.ca = os.path.join(self.dir, "ca.pem")
        self.cert = os.path.join(self.dir, "client.pem")
        self.key = os.path.join(self.dir, "client-key.pem")
        for path in (self.ca, self.cert, self.key):
            with open(path, "w") as f:
                f.write("-----BEGIN CERTIFICATE-----\n")

    def test_default(self) -> None:
        """
        When a hypervisor has no vnc_tls, or vnc_tls: null, VeNCrypt is off for it.
        """
        config = parse("hypervisors: [{uri: 'qemu:///system'}, {uri: 'test:///default', vnc_tls: null}]")
        self.assertEqual([h.vnc_tls for h in config.hypervisors], [None, None])
        self.assertEqual(Config().hypervisors[0].vnc_tls, None)

    def test_vncTls(self) -> None:
        """
        When vnc_tls is given, its files, verify, server_name and allow_anonymous are kept; verify defaults to true.
        """
        config = parse(
            f"""
            hypervisors:
              - uri: "qemu+tls://kvm1/system"
                vnc_tls:
                  ca_file: {self.ca}
                  cert_file: {self.cert}
                  key_file: {self.key}
                  server_name: KVM1.example.com
              - uri: "qemu+tls://kvm2/system"
                vnc_tls: {{ca_file: {self.ca}}}
              - uri: "qemu+tls://kvm3/system"
                vnc_tls: {{verify: false, allow_anonymous: true}}
            """
        )
        tls = [h.vnc_tls for h in config.hypervisors]
        self.assertEqual(tls[0], VncTLSConfig(self.ca, self.cert, self.key, True, "kvm1.example.com", False))
        self.assertEqual(tls[1], VncTLSConfig(ca_file=self.ca))
        self.assertTrue(tls[1].verify)
        self.assertEqual(tls[2], VncTLSConfig(verify=False, allow_anonymous=True))

    def test_badVncTls(self) -> None:
        """
        When a vnc_tls value is bad, missing or contradictory, the error names the key.
        """
        def doc(tls: str) -> str:
            return "hypervisors: [{uri: 'qemu:///system', vnc_tls: %s}]" % (tls,)

        self.assertConfigError(
            doc("{ca_file: /nonexistent/ca.pem}"),
            "hypervisors[0].vnc_tls.ca_file: '/nonexistent/ca.pem' is not a readable file"
            " (expected the path of an existing PEM file)",
        )
        self.assertConfigError(
            doc(f"{{key_file: {self.key}}}"),
            "hypervisors[0].vnc_tls.key_file: needs hypervisors[0].vnc_tls.cert_file"
            " (expected both, or only cert_file holding both)",
        )
        self.assertConfigError(
            doc(f"{{verify: false, ca_file: {self.ca}}}"),
            "hypervisors[0].vnc_tls.verify: False ignores ca_file and server_name"
            " (expected verify: true, or no ca_file/server_name)",
        )
        self.assertConfigError(
            doc("{verify: 'no'}"),
            "hypervisors[0].vnc_tls.verify: 'no' is not a boolean (expected true or false)",
        )
        self.assertConfigError(
            doc("{server_name: 'not a name'}"),
            "hypervisors[0].vnc_tls.server_name: 'not a name' is not a host"
            " (expected a host name, an IPv4 or an IPv6 address)",
        )
        self.assertConfigError(
            doc("{ca: x}"),
            "hypervisors[0].vnc_tls.ca: unknown key"
            " (expected one of: ca_file, cert_file, key_file, verify, server_name, allow_anonymous)",
        )
        self.assertConfigError(
            doc("yes"),
            "hypervisors[0].vnc_tls: True is not a mapping"
            " (expected keys: ca_file, cert_file, key_file, verify, server_name, allow_anonymous)",
        )


class TokensTests(ConfigTestMixin, SynchronousTestCase):
    def test_redis(self) -> None:
        """
        When the redis backend is configured, its URL and timeouts are kept.
        """
        config = parse(
            "tokens: {backend: redis, redis_url: 'redis://10.0.0.9:6380/2', redis_timeout: 500ms, lease_ttl: 1m}"
        )
        self.assertEqual(
            (config.tokens.backend, config.tokens.redis_url, config.tokens.redis_timeout, config.tokens.lease_ttl),
            ("redis", "redis://10.0.0.9:6380/2", 0.5, 60.0),
        )

    def test_redisTLS(self) -> None:
        """When redis_url uses rediss://, it is accepted (Redis over TLS)."""
        config = parse("tokens: {backend: redis, redis_url: 'rediss://:pw@redis.example:6380/1'}")
        self.assertEqual(config.tokens.redis_url, "rediss://:pw@redis.example:6380/1")

    def test_badTokens(self) -> None:
        """
        When the backend or URL is bad, the error names the key; a URL password is hidden.
        """
        self.assertConfigError(
            "tokens: {backend: etcd}",
            "tokens.backend: 'etcd' is not a valid choice (expected one of memory, redis)",
        )
        self.assertConfigError(
            "tokens: {redis_url: 'http://x'}",
            "tokens.redis_url: 'http://x' is not a redis:// URL (expected e.g. redis://127.0.0.1:6379/0)",
        )
        error = self.assertRaises(ConfigError, parse, "tokens: {redis_url: 'redis://:s3cret@x/db'}")
        self.assertEqual(
            str(error),
            "tokens.redis_url: <hidden> is not a redis:// URL (expected e.g. redis://127.0.0.1:6379/0)",
        )
        self.assertConfigError(
            "tokens: {lease_ttl: forever}",
            "tokens.lease_ttl: 'forever' is not a duration (expected e.g. 500ms, 30s, 5m, 1h)",
        )


class LoggingTests(ConfigTestMixin, SynchronousTestCase):
    def test_logging(self) -> None:
        """
        When level and format are valid (any case), they are kept in lower case.
        """
        config = parse("logging: {level: DEBUG, format: json, access_log: false}")
        self.assertEqual((config.logging.level, config.logging.format), ("debug", "json"))
        self.assertIs(config.logging.access_log, False)
        self.assertIs(parse("logging: {}").logging.access_log, True)

    def test_badLogging(self) -> None:
        """
        When level or format is unknown, the error lists the choices.
        """
        self.assertConfigError(
            "logging: {level: verbose}",
            "logging.level: 'verbose' is not a valid choice (expected one of debug, info, warn, error)",
        )
        self.assertConfigError(
            "logging: {format: xml}",
            "logging.format: 'xml' is not a valid choice (expected one of text, json)",
        )


class DocumentTests(ConfigTestMixin, SynchronousTestCase):
    def test_unknownKeys(self) -> None:
        """
        When a key is unknown at any level, the error names it and lists the valid ones.
        """
        self.assertConfigError(
            "consoel: {}",
            "consoel: unknown key (expected one of: console, server, auth, hypervisors, tokens, logging, audit, recording)",
        )
        self.assertConfigError(
            "server: {port: 80}",
            "server.port: unknown key (expected one of: listen, allowed_origins, trusted_proxies, workers, request_timeout, max_pending_connections, max_pending_per_client, metrics_local)",
        )
        self.assertConfigError(
            "tokens: {ttl: 5m}",
            "tokens.ttl: unknown key (expected one of: backend, redis_url, redis_timeout, lease_ttl, redis_sentinel)",
        )
        self.assertConfigError(
            "logging: {file: x}", "logging.file: unknown key (expected one of: level, format, access_log)"
        )

    def test_notMappings(self) -> None:
        """
        When the document or a section is not a mapping, the error names it.
        """
        self.assertConfigError(
            "- a\n- b\n",
            "vapor.conf: ['a', 'b'] is not a mapping"
            " (expected keys: console, server, auth, hypervisors, tokens, logging, audit, recording)",
        )
        self.assertConfigError(
            "console: 5",
            "console: 5 is not a mapping (expected keys: max_connections_per_vm, max_total_connections,"
            " token_ttl, connection_timeout, idle_timeout, allowed_hosts, enable_tls, buffer_size,"
            " cleanup_interval, bind_client_ip, max_message_size, max_connections_per_user, max_connections_per_client)",
        )

    def test_badYaml(self) -> None:
        """
        When the text is not YAML, the error gives the line and column.
        """
        self.assertConfigError(
            "console: [\n",
            "vapor.conf: not valid YAML at line 2, column 1: expected the node content, but found '<stream end>'",
        )

    def test_duplicateKey(self) -> None:
        """
        When a key is given twice in a mapping, it is an error rather than a silent override.
        """
        self.assertConfigError(
            "console:\n  token_ttl: 1m\n  token_ttl: 2m\n",
            "vapor.conf line 3: key 'token_ttl' is given twice (expected each key once per mapping)",
        )

    def test_loadMissingFile(self) -> None:
        """
        When the file cannot be read, the error names the path and the reason.
        """
        path = self.mktemp()
        error = self.assertRaises(ConfigError, load_config, path)
        self.assertEqual(str(error), f"{path}: cannot read the config file (No such file or directory)")


def _self_signed_pem(path: str) -> str:
    """
    Write a self-signed key and certificate for localhost
    (L{tests.integration.stack.self_signed}) into one PEM file at C{path};
    answer C{path}.
    """
    from tests.integration.stack import self_signed

    directory = path + ".d"
    os.makedirs(directory)
    key_path, cert_path, _ = self_signed(directory)
    with open(path, "wb") as out:
        for part in (key_path, cert_path):
            with open(part, "rb") as f:
                out.write(f.read())
    return path


class AuditConfigTests(SynchronousTestCase):
    def test_default(self):
        """
        When vapor.conf has no audit section, there is no audit file.
        """
        self.assertIsNone(parse_config("").audit.file)

    def test_file(self):
        """
        When audit.file is an absolute path, it is kept; a relative one is refused naming the key.
        """
        self.assertEqual(parse_config("audit: {file: /var/log/vp/audit.jsonl}").audit.file, "/var/log/vp/audit.jsonl")
        with self.assertRaises(ConfigError) as e:
            parse_config("audit: {file: audit.jsonl}")
        self.assertEqual(
            str(e.exception),
            "audit.file: 'audit.jsonl' is not an absolute path (expected e.g. /var/log/vaporproxy/audit.jsonl)",
        )


class RecordingConfigTests(SynchronousTestCase):
    def test_defaults(self):
        """
        When vapor.conf has no recording section, recording is off with the documented defaults.
        """
        recording = parse_config("").recording
        self.assertEqual(
            (recording.enabled, recording.dir, recording.vms, recording.include_input),
            (False, "/var/lib/vaporproxy/recordings", ("*",), False),
        )
        self.assertEqual((recording.retention, recording.max_total_size), (30 * 86400.0, 10 * 1024**3))

    def test_values(self):
        """
        When every key is given, days and gigabytes are understood.
        """
        recording = parse_config(
            "recording: {enabled: true, dir: /srv/rec, vms: [prod-*], include_input: true,"
            " retention: 7d, max_total_size: 2GB}"
        ).recording
        self.assertEqual(
            recording,
            RecordingConfig(True, "/srv/rec", ("prod-*",), True, 7 * 86400.0, 2 * 1024**3),
        )

    def test_bad(self):
        """
        When a recording key is wrong, the error names the key and what was expected.
        """
        for text, message in (
            ("recording: {dir: rec}", "recording.dir: 'rec' is not an absolute path (expected e.g. /var/lib/vaporproxy/recordings)"),
            ("recording: {vms: []}", None),
            ("recording: {retention: forever}", None),
            ("recording: {record: true}", "recording.record: unknown key (expected one of: enabled, dir, vms, include_input, retention, max_total_size)"),
        ):
            with self.assertRaises(ConfigError) as e:
                parse_config(text)
            if message is not None:
                self.assertEqual(str(e.exception), message)
            self.assertTrue(str(e.exception).startswith("recording."))


class StepUpConfigTests(SynchronousTestCase):
    def test_parse(self):
        """
        When auth.policies is given, durations and defaults apply, and a bad entry names its key.
        """
        policies = parse_config("auth: {policies: [{vms: [prod-*], max_auth_age: 10m}]}").auth.policies
        self.assertEqual(policies, (StepUpPolicy(vms=("prod-*",), require_mfa=True, max_auth_age=600.0),))
        with self.assertRaises(ConfigError) as e:
            parse_config("auth: {policies: [{require_mfa: true}]}")
        self.assertEqual(
            str(e.exception), "auth.policies[0].vms: missing (expected a list of VM name/UUID patterns)"
        )
        with self.assertRaises(ConfigError) as e:
            parse_config("auth: {policies: [{vms: ['*'], mfa: true}]}")
        self.assertTrue(str(e.exception).startswith("auth.policies[0].mfa: unknown key"))
