"""TLS, mTLS and bearer tokens, with certificates this test generates (`cryptography`)."""

from __future__ import annotations

import datetime
import ipaddress
import logging
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc

from nextchar.client import NextCharClient, NextCharError
from nextchar.client.cli import main as client_main
from nextchar.kserve import grpc_predict_v2_pb2 as kpb
from nextchar.server.security import SecurityConfigError, TokenSet, load_tokens, server_credentials
from nextchar.server.settings import ServerSettings
from nextchar.v1 import nextchar_pb2 as pb
from nextchar.v1 import nextchar_pb2_grpc as pb_grpc

TOKEN = "test-token-0123456789abcdef"
OTHER_TOKEN = "other-token-0123456789abcdef"


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _cert(subject: str, key, issuer: str, issuer_key, *, ca: bool = False,
          san: list[x509.GeneralName] | None = None) -> x509.Certificate:
    now = datetime.datetime.now(datetime.timezone.utc)
    b = (x509.CertificateBuilder().subject_name(_name(subject)).issuer_name(_name(issuer))
         .public_key(key.public_key()).serial_number(x509.random_serial_number())
         .not_valid_before(now - datetime.timedelta(minutes=5))
         .not_valid_after(now + datetime.timedelta(days=1))
         .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if san:
        b = b.add_extension(x509.SubjectAlternativeName(san), critical=False)
    return b.sign(issuer_key, hashes.SHA256())


@dataclass
class Pki:
    ca: Path  # signs the server certificate
    server_cert: Path
    server_key: Path
    client_ca: Path  # signs client certificates
    client_cert: Path
    client_key: Path
    stranger_cert: Path  # self-signed: no CA vouches for it
    stranger_key: Path


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _key_pem(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    d = tmp_path_factory.mktemp("pki")
    ca_key, client_ca_key, server_key, client_key, stranger_key = (_key() for _ in range(5))
    ca = _cert("nextchar test CA", ca_key, "nextchar test CA", ca_key, ca=True)
    client_ca = _cert("nextchar client CA", client_ca_key, "nextchar client CA", client_ca_key,
                      ca=True)
    server = _cert("localhost", server_key, "nextchar test CA", ca_key,
                   san=[x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
    client = _cert("client-1", client_key, "nextchar client CA", client_ca_key)
    stranger = _cert("stranger", stranger_key, "stranger", stranger_key)
    return Pki(
        ca=_write(d / "ca.pem", _pem(ca)),
        server_cert=_write(d / "server.pem", _pem(server)),
        server_key=_write(d / "server.key", _key_pem(server_key)),
        client_ca=_write(d / "client-ca.pem", _pem(client_ca)),
        client_cert=_write(d / "client.pem", _pem(client)),
        client_key=_write(d / "client.key", _key_pem(client_key)),
        stranger_cert=_write(d / "stranger.pem", _pem(stranger)),
        stranger_key=_write(d / "stranger.key", _key_pem(stranger_key)),
    )


def _predict_code(client: NextCharClient) -> grpc.StatusCode:
    try:
        client.predict(["abc"], timeout_s=10)
    except NextCharError as e:
        return e.code
    return grpc.StatusCode.OK


# -- TLS ---------------------------------------------------------------------------------------
def test_tls_server_refuses_plaintext_and_serves_tls(start_server, tiny_artifact, pki: Pki) -> None:
    st = start_server(model=tiny_artifact, tls_cert=pki.server_cert, tls_key=pki.server_key)
    with NextCharClient(st.address) as plain:
        assert _predict_code(plain) == grpc.StatusCode.UNAVAILABLE
    with NextCharClient(st.address, tls_ca=pki.ca) as tls:
        (pred,) = tls.predict(["abc"], top_k=2)
        assert len(pred.top) == 2
    # A client that trusts another CA does not talk to this server.
    with NextCharClient(st.address, tls_ca=pki.client_ca) as wrong_ca:
        assert _predict_code(wrong_ca) == grpc.StatusCode.UNAVAILABLE


def test_mtls_requires_a_client_certificate_from_the_client_ca(start_server, tiny_artifact,
                                                               pki: Pki) -> None:
    st = start_server(model=tiny_artifact, tls_cert=pki.server_cert, tls_key=pki.server_key,
                      tls_client_ca=pki.client_ca, tls_require_client_cert=True)
    with NextCharClient(st.address, tls_ca=pki.ca) as no_cert:
        assert _predict_code(no_cert) == grpc.StatusCode.UNAVAILABLE
    with NextCharClient(st.address, tls_ca=pki.ca, tls_cert=pki.stranger_cert,
                        tls_key=pki.stranger_key) as stranger:
        assert _predict_code(stranger) == grpc.StatusCode.UNAVAILABLE
    with NextCharClient(st.address, tls_ca=pki.ca, tls_cert=pki.client_cert,
                        tls_key=pki.client_key) as client:
        assert _predict_code(client) == grpc.StatusCode.OK


def _encrypted(key_path: Path, out: Path) -> Path:
    key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    return _write(out, key.private_bytes(serialization.Encoding.PEM,
                                         serialization.PrivateFormat.PKCS8,
                                         serialization.BestAvailableEncryption(b"secret")))


def test_a_client_key_that_cannot_serve_its_certificate_is_refused_before_dialing(
        pki: Pki, tmp_path: Path, capsys) -> None:
    """Without the check, gRPC logs core lines and every call fails UNAVAILABLE with no word
    about the key; an encrypted key would do the same (gRPC takes no passphrase)."""
    def refused(cert: Path, key: Path) -> str:
        with pytest.raises(NextCharError) as e:
            NextCharClient("127.0.0.1:1", tls_ca=pki.ca, tls_cert=cert, tls_key=key)
        assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT
        return e.value.details

    assert refused(pki.client_cert, pki.stranger_key) == (
        f"--tls-key {pki.stranger_key} does not go with --tls-cert {pki.client_cert}: it is not "
        f"the certificate's private key")
    enc = _encrypted(pki.client_key, tmp_path / "enc.key")
    assert refused(pki.client_cert, enc) == (
        f"--tls-key {enc}: the key is encrypted; gRPC needs it unencrypted "
        f"(openssl pkey -in {enc} -out plain.key)")
    assert refused(pki.client_key, pki.client_key).startswith(
        f"--tls-cert {pki.client_key} must hold a PEM certificate and --tls-key {pki.client_key} "
        f"its PEM private key: OpenSSL cannot load them as such")
    # The CLI says the same in one line and exits non-zero.
    assert client_main(["health", "--server", "127.0.0.1:1", "--tls-ca", str(pki.ca),
                        "--tls-cert", str(pki.client_cert), "--tls-key", str(pki.stranger_key)]) != 0
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.endswith("it is not the certificate's private key")


def test_tls_server_name_override(start_server, tiny_artifact, pki: Pki) -> None:
    st = start_server(model=tiny_artifact, tls_cert=pki.server_cert, tls_key=pki.server_key)
    with NextCharClient(f"localhost:{st.port}", tls_ca=pki.ca) as by_name:
        assert _predict_code(by_name) == grpc.StatusCode.OK
    with NextCharClient(st.address, tls_ca=pki.ca, tls_server_name="not-the-server") as wrong:
        assert _predict_code(wrong) == grpc.StatusCode.UNAVAILABLE


# -- tokens ------------------------------------------------------------------------------------
def test_tokens_wrong_missing_and_right(start_server, tiny_artifact) -> None:
    st = start_server(model=tiny_artifact, auth_tokens=f"{TOKEN},{OTHER_TOKEN}")
    with NextCharClient(st.address) as none:
        with pytest.raises(NextCharError) as e:
            none.predict(["abc"])
        assert e.value.code == grpc.StatusCode.UNAUTHENTICATED
        assert "missing bearer token" in e.value.details
        assert none.health() == "SERVING"  # health is open by default
    with NextCharClient(st.address, token="wrong-token-0123456789abcdef") as wrong:
        with pytest.raises(NextCharError) as e:
            wrong.predict(["abc"])
        assert e.value.code == grpc.StatusCode.UNAUTHENTICATED
        assert e.value.details == "bearer token not accepted"
        with pytest.raises(NextCharError) as e:
            wrong.reload_model()
        assert e.value.code == grpc.StatusCode.UNAUTHENTICATED
    for token in (TOKEN, OTHER_TOKEN):
        with NextCharClient(st.address, token=token) as right:
            assert len(right.predict(["abc"], top_k=3)[0].top) == 3
            assert right.model_info().version == st.server.runtime().predictor.artifact.version
            assert right.reload_model().reloaded is False
            assert "".join(right.generate("abc", max_chars=5, seed=1))  # streams too
    # The raw header works without the client class, and scheme case does not matter.
    with grpc.insecure_channel(st.address) as ch:
        stub = pb_grpc.NextCharStub(ch)
        stub.Predict(pb.PredictRequest(texts=["abc"]), metadata=[("authorization", f"bearer {TOKEN}")])
        with pytest.raises(grpc.RpcError) as e:
            stub.Predict(pb.PredictRequest(texts=["abc"]), metadata=[("authorization", TOKEN)])
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_admin_tokens_alone_may_change_what_is_served(start_server, tiny_artifact,
                                                      tmp_path: Path) -> None:
    """With --admin-tokens-file, the other tokens infer but may not reload, load or unload
    (PERMISSION_DENIED / 403, Triton's restricted repository API); admin tokens do both."""
    from http_util import call

    from nextchar.kserve import grpc_predict_v2_pb2 as kpb
    from nextchar.kserve import grpc_predict_v2_pb2_grpc as kpb_grpc
    from nextchar.server.security import CONTROL_ADMIN_ONLY

    admin_file = tmp_path / "admin.txt"
    admin_file.write_text(f"# operators\n{OTHER_TOKEN}\n")
    admin_file.chmod(0o600)
    st = start_server(model=tiny_artifact, auth_tokens=TOKEN, admin_tokens_file=admin_file)
    name = st.server.runtime().name
    with NextCharClient(st.address, token=TOKEN) as user:
        assert len(user.predict(["abc"], top_k=2)[0].top) == 2
        with pytest.raises(NextCharError) as e:
            user.reload_model()
        assert (e.value.code, e.value.details) == (grpc.StatusCode.PERMISSION_DENIED,
                                                   CONTROL_ADMIN_ONLY)
    with grpc.insecure_channel(st.address) as ch:
        with pytest.raises(grpc.RpcError) as e:
            kpb_grpc.GRPCInferenceServiceStub(ch).RepositoryModelUnload(
                kpb.RepositoryModelUnloadRequest(model_name=name),
                metadata=[("authorization", f"Bearer {TOKEN}")], timeout=10)
        assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
    for path in (f"/v2/repository/models/{name}/unload", f"/v2/repository/models/{name}/load"):
        r = call(st.http_url, "POST", path, {}, headers={"authorization": f"Bearer {TOKEN}"})
        assert (r.status, r.json()) == (403, {"error": CONTROL_ADMIN_ONLY})
    assert call(st.http_url, "GET", f"/v2/models/{name}",
                headers={"authorization": f"Bearer {TOKEN}"}).status == 200
    with NextCharClient(st.address, token=OTHER_TOKEN) as admin:
        assert len(admin.predict(["abc"], top_k=2)[0].top) == 2  # an admin token infers too
        assert admin.reload_model().reloaded is False
    r = call(st.http_url, "POST", f"/v2/repository/models/{name}/load", {},
             headers={"authorization": f"Bearer {OTHER_TOKEN}"})
    assert (r.status, r.json()) == (200, {})
    with NextCharClient(st.address) as none:  # no token: UNAUTHENTICATED as before
        with pytest.raises(NextCharError) as e:
            none.reload_model()
        assert e.value.code == grpc.StatusCode.UNAUTHENTICATED


def test_health_and_reflection_openness_is_configurable(start_server, tiny_artifact) -> None:
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    def list_services(channel: grpc.Channel, metadata: list[tuple[str, str]]) -> grpc.StatusCode:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        try:
            for _ in stub.ServerReflectionInfo(iter([request]), metadata=metadata, timeout=10):
                pass
        except grpc.RpcError as e:
            return e.code()
        return grpc.StatusCode.OK

    closed = start_server(model=tiny_artifact, auth_tokens=TOKEN, auth_open_health=False)
    with grpc.insecure_channel(closed.address) as ch:
        health = health_pb2_grpc.HealthStub(ch)
        with pytest.raises(grpc.RpcError) as e:
            health.Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
        auth = [("authorization", f"Bearer {TOKEN}")]
        assert health.Check(health_pb2.HealthCheckRequest(), metadata=auth).status == \
            health_pb2.HealthCheckResponse.SERVING
        assert list_services(ch, []) == grpc.StatusCode.UNAUTHENTICATED  # closed by default
        assert list_services(ch, auth) == grpc.StatusCode.OK
    opened = start_server(model=tiny_artifact, auth_tokens=TOKEN, auth_open_reflection=True)
    with grpc.insecure_channel(opened.address) as ch:
        assert list_services(ch, []) == grpc.StatusCode.OK


def test_tls_and_token_together_through_the_cli(start_server, tiny_artifact, pki: Pki,
                                                tmp_path: Path, capsys, monkeypatch) -> None:
    tokens = tmp_path / "tokens.txt"
    tokens.write_text(f"# ops team\n{TOKEN}\n\n")
    st = start_server(model=tiny_artifact, tls_cert=pki.server_cert, tls_key=pki.server_key,
                      auth_tokens_file=tokens)
    base = ["--server", st.address, "--tls-ca", str(pki.ca)]
    assert client_main(["predict", *base, "--token", TOKEN, "--top-k", "1", "abc"]) == 0
    assert client_main(["predict", *base, "abc"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("nextchar predict: UNAUTHENTICATED: missing bearer token")
    assert len(err.strip().splitlines()) == 1
    monkeypatch.setenv("NEXTCHAR_TOKEN", TOKEN)
    monkeypatch.setenv("NEXTCHAR_TLS_CA", str(pki.ca))
    import importlib

    import nextchar.client.cli as cli

    importlib.reload(cli)  # flag defaults read the environment at import
    try:
        assert cli.main(["reload", "--server", st.address]) == 0
        out = capsys.readouterr().out
        assert '"reloaded": false' in out
    finally:
        monkeypatch.delenv("NEXTCHAR_TOKEN")
        monkeypatch.delenv("NEXTCHAR_TLS_CA")
        importlib.reload(cli)
    # An option to fix, found once the client reads it: a usage error (2), nothing was sent.
    assert client_main(["health", "--server", st.address, "--tls-ca",
                        str(tmp_path / "nope.pem")]) == 2
    assert capsys.readouterr().err == (f"nextchar health: --tls-ca {tmp_path / 'nope.pem'}: "
                                       f"cannot read (No such file or directory)\n")


# -- configuration errors ----------------------------------------------------------------------
def test_bad_security_settings_fail_with_one_line(tmp_path: Path, pki: Pki) -> None:
    def creds(**kw) -> str:
        with pytest.raises(SecurityConfigError) as e:
            server_credentials(ServerSettings(**kw))
        return str(e.value)

    assert "--tls-cert needs --tls-key" in creds(tls_cert=pki.server_cert)
    assert "need --tls-cert" in creds(tls_key=pki.server_key)
    assert "needs --tls-client-ca" in creds(tls_cert=pki.server_cert, tls_key=pki.server_key,
                                            tls_require_client_cert=True)
    assert "cannot read" in creds(tls_cert=tmp_path / "missing.pem", tls_key=pki.server_key)
    (tmp_path / "empty.txt").write_text("no pem here\n")
    assert "no PEM 'CERTIFICATE'" in creds(tls_cert=pki.server_key, tls_key=pki.server_key)
    assert "no PEM block (-----BEGIN ...)" in creds(tls_cert=pki.server_cert,
                                                    tls_key=tmp_path / "empty.txt")
    # A key that is not the certificate's: gRPC says only "cannot bind" after log lines.
    assert creds(tls_cert=pki.server_cert, tls_key=pki.client_key) == (
        f"--tls-key {pki.client_key} does not go with --tls-cert {pki.server_cert}: it is not "
        f"the certificate's private key")
    enc = _encrypted(pki.server_key, tmp_path / "enc.key")
    assert creds(tls_cert=pki.server_cert, tls_key=enc) == (
        f"--tls-key {enc}: the key is encrypted; gRPC needs it unencrypted "
        f"(openssl pkey -in {enc} -out plain.key)")
    assert server_credentials(ServerSettings()) is None

    def tokens(**kw) -> str:
        with pytest.raises(SecurityConfigError) as e:
            load_tokens(ServerSettings(**kw))
        return str(e.value)

    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing here\n\n")
    assert "no tokens in it" in tokens(auth_tokens_file=empty)
    for blank in (" ", ",", " , ,", "\n"):  # set to nothing usable: refused, not auth off
        assert tokens(auth_tokens=blank) == (
            "NEXTCHAR_AUTH_TOKENS is set but holds no tokens (comma-separated; unset it, or "
            "set it empty, to turn auth off)")
    assert load_tokens(ServerSettings(auth_tokens="")) is None
    assert "at least 16 characters" in tokens(auth_tokens="short")
    assert load_tokens(ServerSettings()) is None


def test_a_token_file_every_user_can_read_is_named_at_start(tmp_path: Path, caplog) -> None:
    f = tmp_path / "tokens.txt"
    f.write_text(f"{TOKEN}\n")
    for mode, warned in ((0o600, False), (0o640, False), (0o644, True)):
        f.chmod(mode)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="nextchar.server.security"):
            assert load_tokens(ServerSettings(auth_tokens_file=f)) is not None
        assert [r.getMessage() for r in caplog.records] == (
            [f"--auth-tokens-file {f} is readable by every user (mode 644): chmod o-rwx it"]
            if warned else []), mode


def test_tokens_from_env_and_file_are_merged(tmp_path: Path, monkeypatch) -> None:
    f = tmp_path / "tokens.txt"
    f.write_text(f"{OTHER_TOKEN}\n")
    monkeypatch.setenv("NEXTCHAR_AUTH_TOKENS", f" {TOKEN} ,")
    ts = load_tokens(ServerSettings(auth_tokens_file=f))
    assert isinstance(ts, TokenSet) and len(ts) == 2
    assert ts.accepts(TOKEN) and ts.accepts(OTHER_TOKEN)
    assert not ts.restricts_control and ts.may_control(TOKEN)
    # Admin tokens alone turn auth on; they are accepted, and only they may control.
    monkeypatch.delenv("NEXTCHAR_AUTH_TOKENS")
    ts = load_tokens(ServerSettings(admin_tokens_file=f))
    assert ts is not None and ts.restricts_control
    assert ts.accepts(OTHER_TOKEN) and ts.may_control(OTHER_TOKEN)
    assert not ts.accepts(TOKEN) and not ts.may_control(TOKEN)
    f.write_text("short\n")
    with pytest.raises(SecurityConfigError) as e:
        load_tokens(ServerSettings(admin_tokens_file=f))
    assert "at least 16 characters" in str(e.value)
    assert not ts.accepts(TOKEN[:-1]) and not ts.accepts("")


def test_serve_cli_reports_a_bad_tls_setting_in_one_line(tiny_artifact, tmp_path, capsys) -> None:
    from nextchar.server.cli import build_parser
    from nextchar.server.cli import main as serve_main

    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:  # serve's main installs its own log handler on the root logger: put pytest's back
        assert serve_main(["--model", str(tiny_artifact), "--port", "0",
                           "--tls-cert", str(tmp_path / "missing.pem"), "--tls-key", "k.pem"]) == 1
    finally:
        root.handlers[:], _ = saved
        root.setLevel(saved[1])
    err = capsys.readouterr().err.strip()
    assert err.startswith("nextchar serve: --tls-cert ") and "cannot read" in err
    assert "\n" not in err
    # Tokens are read from the environment or a file only: no flag would put them in `ps`.
    assert "--auth-tokens" not in build_parser().format_help().replace("--auth-tokens-file", "")


@pytest.mark.parametrize(("flags", "message"), [
    (["--tls-cert", "c.pem"], "--tls-cert needs --tls-key (the certificate's private key)"),
    (["--tls-client-ca", "ca.pem"],
     "--tls-key/--tls-client-ca/--tls-require-client-cert need --tls-cert as well"),
    (["--tls-cert", "c.pem", "--tls-key", "k.pem", "--tls-require-client-cert"],
     "--tls-require-client-cert needs --tls-client-ca (the CA that signs client certificates)"),
    (["--tls-cert", "c.pem", "--tls-key", "k.pem", "--tls-client-ca", "ca.pem"],
     "--tls-client-ca needs --tls-require-client-cert (without it gRPC would not verify client "
     "certificates)"),
])
def test_serve_cli_tls_flags_missing_their_partner_are_usage_errors(
        tiny_artifact, capsys, flags: list[str], message: str) -> None:
    """Exit 2, like every other bad flag, before any file is read or the model loads."""
    from nextchar.server.cli import main as serve_main

    assert serve_main(["--model", str(tiny_artifact), "--port", "0", *flags]) == 2
    assert capsys.readouterr().err == f"nextchar serve: {message}\n"


def test_refused_big_requests_are_neither_decoded_before_auth_nor_kept(server_process,
                                                                      tiny_artifact) -> None:
    """A 15 MB Predict (5M texts): without a token it is refused before it is decoded; with one
    it is refused (too many texts) and let go. Either used to stay in memory until a garbage
    collection, which such requests (few Python objects) do not set off: ~250 MB per call,
    gigabytes from a caller without a token (an aborted call's exception sits in a reference
    cycle with the frames that held the request)."""
    # Two malloc arenas: the calls land on different threads, and each thread's arena keeps
    # the first working set it saw (one CI run grew 170 MB on the second call, then held).
    # This test is about objects kept alive, not about how many arenas glibc opens.
    sp = server_process(["--model", str(tiny_artifact), "--no-http"],
                        env={"NEXTCHAR_AUTH_TOKENS": TOKEN, "MALLOC_ARENA_MAX": "2"})
    raw = pb.PredictRequest(texts=["a"] * 5_000_000).SerializeToString()
    with grpc.insecure_channel(sp.address, options=[("grpc.max_send_message_length",
                                                     64 << 20)]) as ch:
        call = ch.unary_unary("/nextchar.v1.NextChar/Predict",
                              request_serializer=lambda b: b, response_deserializer=lambda b: b)
        for metadata, code in ((None, grpc.StatusCode.UNAUTHENTICATED),
                               ((("authorization", f"Bearer {TOKEN}"),),
                                grpc.StatusCode.INVALID_ARGUMENT)):
            growth = []
            for _ in range(6):
                with pytest.raises(grpc.RpcError) as e:
                    call(raw, timeout=60, metadata=metadata)
                assert e.value.code() == code, e.value.details()
                growth.append(sp.rss_kib())
            # The first calls' working set stays with the allocator; the four that follow must
            # not add to it (they added ~250 MB each before: ~1 GB).
            assert growth[-1] - growth[1] < 100 * 1024, (code, growth)
        # A refusal raised from another error (bad UTF-8 in the last of 1,024 texts of 14 kB)
        # let go too: that error's traceback held the decoded texts (~44 MB per call).
        with NextCharClient(sp.address, token=TOKEN) as c:
            name = c.model_info().name
        infer = ch.unary_unary("/inference.GRPCInferenceService/ModelInfer",
                               request_serializer=lambda b: b, response_deserializer=lambda b: b)
        texts = [b"a" * 14_000] * 1023 + [b"a" * 13_999 + b"\xff"]
        bad = kpb.ModelInferRequest(model_name=name, inputs=[kpb.ModelInferRequest.InferInputTensor(
            name="text", datatype="BYTES", shape=[1024],
            contents=kpb.InferTensorContents(bytes_contents=texts))]).SerializeToString()
        growth = []
        for _ in range(6):
            with pytest.raises(grpc.RpcError) as e:
                infer(bad, timeout=60, metadata=(("authorization", f"Bearer {TOKEN}"),))
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, e.value.details()
            growth.append(sp.rss_kib())
        assert growth[-1] - growth[1] < 100 * 1024, growth
        # Decoded after the check, an undecodable request is still INVALID_ARGUMENT.
        with pytest.raises(grpc.RpcError) as e:
            call(b"\x0a\x02\xff\xfe", timeout=30, metadata=(("authorization", f"Bearer {TOKEN}"),))
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, e.value.details()


def test_http_model_control_trusts_the_socket_peer_not_forwarded_headers(start_server,
                                                                         tiny_artifact) -> None:
    """uvicorn rewrites the client address from X-Forwarded-For when the peer is trusted
    (127.0.0.1 by default, any with FORWARDED_ALLOW_IPS='*'), which would let a header decide
    the loopback-only control: here a loopback caller claiming 10.1.2.3 was refused, and a
    remote one claiming 127.0.0.1 behind FORWARDED_ALLOW_IPS='*' let through."""
    from http_util import call

    st = start_server(model=tiny_artifact)
    with NextCharClient(st.address) as c:
        name = c.model_info().name
    r = call(st.http_url, "POST", f"/v2/repository/models/{name}/load", {},
             headers={"x-forwarded-for": "10.1.2.3", "forwarded": "for=10.1.2.3"})
    assert (r.status, r.json()) == (200, {})
