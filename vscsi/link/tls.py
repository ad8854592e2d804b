"""Mutual TLS between arrays: TLS 1.3 only, a certificate required both ways, and each peer
pinned: its certificate must be byte for byte the `peer_cert` of a `[[remote]]`, and the serial
in it the serial configured there."""

from __future__ import annotations

import ssl
from collections.abc import Sequence
from pathlib import Path

from cryptography import x509

from vscsi.config import LinkConfig, RemoteConfig
from vscsi.link.keys import KeyMaterialError, identity


class Refused(Exception):
    """A peer this array does not accept; the message is the one-line reason that is logged."""


def context(link: LinkConfig, remotes: Sequence[RemoteConfig], server: bool) -> ssl.SSLContext:
    """A context trusting exactly the certificates of `remotes` (self-signed: each is its own
    trust anchor), presenting this array's."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server else ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    ctx.check_hostname = False  # peers are pinned by certificate, not named by host
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_cert_chain(link.cert, link.key)
    ctx.load_verify_locations(cadata="".join(Path(r.peer_cert).read_text() for r in remotes))
    return ctx


def authenticate(tls: ssl.SSLObject, remotes: Sequence[RemoteConfig]) -> RemoteConfig:
    """The remote whose pinned certificate the peer presented, with the serial configured."""
    der = tls.getpeercert(binary_form=True)
    if der is None:
        raise Refused("presented no certificate")
    for r in remotes:
        if der == ssl.PEM_cert_to_DER_cert(Path(r.peer_cert).read_text()):
            try:
                _, serial = identity(x509.load_der_x509_certificate(der))
            except KeyMaterialError as e:
                raise Refused(f"certificate of {r.where}: {e}") from None
            if serial != r.serial:
                raise Refused(f"certificate says serial {serial}, {r.where}.serial is {r.serial}")
            return r
    raise Refused("certificate is not the peer_cert of any [[remote]]")
