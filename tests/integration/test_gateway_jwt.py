"""User JWTs from a configured issuer: HS256 for local runs, RS256 with a PEM key or the issuer's
JWKS (served here by a real HTTP server on loopback)."""

from __future__ import annotations

import json
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, HTTPServer

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from libs.errors import Unauthenticated
from libs.settings import Settings
from services.gateway.adapters.jwt import JwtVerifier

ORG = str(uuid.uuid4())
ISSUER = "https://id.voelgoed.test"


def _claims(**extra):
    return {"sub": "u-1", "org_id": ORG, "role": "admin", "iss": ISSUER, "exp": int(time.time()) + 60,
            **extra}


@pytest.fixture(scope="module")
def rsa_key():
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


async def test_rs256_with_a_pem_key(rsa_key):
    pem = rsa_key.public_key().public_bytes(serialization.Encoding.PEM,
                                            serialization.PublicFormat.SubjectPublicKeyInfo).decode()
    verifier = JwtVerifier(Settings(jwt_issuer=ISSUER, jwt_public_key=pem, jwt_audience="vge"))
    token = jwt.encode(_claims(aud="vge"), rsa_key, algorithm="RS256")
    actor = await verifier.verify(token)
    assert actor.user_id == "u-1" and str(actor.organization_id) == ORG and actor.role == "admin"
    with pytest.raises(Unauthenticated):  # wrong audience
        await verifier.verify(jwt.encode(_claims(aud="other"), rsa_key, algorithm="RS256"))
    with pytest.raises(Unauthenticated):  # an HS256 token signed with the public key as secret
        await verifier.verify(jwt.encode(_claims(aud="vge"), "not-the-key-not-the-key-not-the-key!", algorithm="HS256"))


async def test_rs256_from_the_issuers_jwks(rsa_key):
    jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(rsa_key.public_key()))
    jwk.update(kid="k1", use="sig", alg="RS256")
    body = json.dumps({"keys": [jwk]}).encode()

    class Jwks(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server's name
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):  # quiet
            pass

    server = HTTPServer(("127.0.0.1", 0), Jwks)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/.well-known/jwks.json"
        verifier = JwtVerifier(Settings(jwt_issuer=ISSUER, jwt_jwks_url=url))
        token = jwt.encode(_claims(), rsa_key, algorithm="RS256", headers={"kid": "k1"})
        assert (await verifier.verify(token)).user_id == "u-1"
        other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        with pytest.raises(Unauthenticated):
            await verifier.verify(jwt.encode(_claims(), other, algorithm="RS256", headers={"kid": "k1"}))
    finally:
        server.shutdown()


async def test_no_issuer_configured_refuses_every_jwt():
    verifier = JwtVerifier(Settings())
    assert not verifier.enabled
    with pytest.raises(Unauthenticated):
        await verifier.verify(jwt.encode(_claims(), "k" * 32, algorithm="HS256"))
