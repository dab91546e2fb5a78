"""A real SMTP server for the mail test (aiosmtpd, from PyPI): AUTH PLAIN/LOGIN with one
user, every accepted message written whole to a directory. Prints `ready <port>` once
it listens; runs until killed.

    python3 smtp_sink.py --port 2525 --dir /tmp/mails --user cadre --password s3cret \
        [--tls-cert cert.pem --tls-key key.pem]   # STARTTLS required, AUTH only after it
"""
import argparse
import pathlib
import ssl
import time

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword


class Save:
    def __init__(self, directory):
        self.directory = pathlib.Path(directory)
        self.count = 0

    async def handle_DATA(self, server, session, envelope):
        self.count += 1
        path = self.directory / f"{self.count:04d}.eml"
        path.write_bytes(envelope.original_content or envelope.content)
        return "250 Message accepted for delivery"


def authenticator(user, password):
    def check(server, session, envelope, mechanism, auth_data):
        ok = (
            isinstance(auth_data, LoginPassword)
            and auth_data.login.decode() == user
            and auth_data.password.decode() == password
        )
        # handled=False: the server answers 535 itself (True would leave the client waiting).
        return AuthResult(success=ok, handled=False)

    return check


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--dir", required=True)
    ap.add_argument("--user", required=True)
    ap.add_argument("--password", required=True)
    ap.add_argument("--tls-cert")
    ap.add_argument("--tls-key")
    args = ap.parse_args()
    tls = {}
    if args.tls_cert:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(args.tls_cert, args.tls_key)
        tls = {"tls_context": context, "require_starttls": True, "auth_require_tls": True}
    else:
        # Plain SMTP on loopback; Cadre's own default is STARTTLS.
        tls = {"auth_require_tls": False}
    controller = Controller(
        Save(args.dir),
        hostname="127.0.0.1",
        port=args.port,
        authenticator=authenticator(args.user, args.password),
        auth_required=True,
        **tls,
    )
    controller.start()
    print(f"ready {args.port}", flush=True)
    while True:
        time.sleep(3600)


if __name__ == "__main__":
    main()
