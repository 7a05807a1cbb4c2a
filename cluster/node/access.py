"""One access rule for everything HTTP that shows who works on what.

``/ui/``, ``/v1/`` and ``/metrics`` answer a request from the loopback address as they always
did; from anywhere else they need a read token: ``Authorization: Bearer TOKEN`` (what
Prometheus' ``authorization`` scrape setting sends), or the ``tetherlab_token`` cookie the page
sets when it is opened once as ``/ui/?token=TOKEN``. ``/livez``, ``/readyz`` and ``/health`` stay
open for load balancers.

Tokens are issued by an admin (``tetherlab ui token``); the cluster stores only their SHA-256,
replicated (KV namespace ``http_tokens``), so every node accepts a token as soon as it applied
the grant, and a revoked token stops working on every node the same way. A node's config may
also name token hashes (``[http] read_token_sha256``): the deploy bundle's Prometheus token
works before the cluster has ever elected a leader.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import re
from collections.abc import Awaitable, Callable, Iterable

from aiohttp import web

from tetherlab.cluster.core.apply import Outcome
from tetherlab.cluster.replica.store import Store

TOKENS_NS = "http_tokens"
TOKEN_COOKIE = "tetherlab_token"
TOKENS_MAX = 1000  # tokens a cluster keeps
TOKEN_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
OPEN_PATHS = frozenset({"/livez", "/readyz", "/health"})
PROTECTED_PREFIXES = ("/ui", "/v1", "/metrics")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def is_loopback(remote: str | None) -> bool:
    if not remote:
        return False  # a unix socket or an unknown peer is not trusted
    try:
        ip = ipaddress.ip_address(remote.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback


class AccessRule:
    def __init__(self, store: Store, configured_hashes: Iterable[str] = ()) -> None:
        self.store = store
        self.configured = {h.lower() for h in configured_hashes}
        self._hashes: set[str] | None = None  # the replicated tokens, reloaded after they change

    def on_applied(self, out: Outcome) -> None:
        if any(ns == TOKENS_NS for ns, _, _ in out.kv_writes):
            self._hashes = None

    def _known(self) -> set[str]:
        if self._hashes is None:
            hashes = set()
            for _, rec in self.store.scan(TOKENS_NS, limit=TOKENS_MAX):
                try:
                    hashes.add(json.loads(rec.value)["sha256"])
                except (ValueError, KeyError, TypeError):
                    continue  # a malformed record grants nothing
            self._hashes = hashes
        return self._hashes | self.configured

    def token_ok(self, token: str | None) -> bool:
        if not token:
            return False
        h = token_hash(token)
        return any(hmac.compare_digest(h, k) for k in self._known())

    @staticmethod
    def protected(path: str) -> bool:
        return path not in OPEN_PATHS and any(path == p or path.startswith(p + "/") for p in PROTECTED_PREFIXES)

    def middleware(self) -> Callable[[web.Request, Handler], Awaitable[web.StreamResponse]]:
        @web.middleware
        async def check(request: web.Request, handler: Handler) -> web.StreamResponse:
            if not self.protected(request.path) or is_loopback(request.remote):
                return await handler(request)
            auth = request.headers.get("Authorization", "")
            bearer = auth[7:].strip() if auth[:7].lower() == "bearer " else None
            query = request.query.get("token")
            if query and request.path.startswith("/ui") and self.token_ok(query):
                # The page was opened with its token once: keep it in a cookie, drop it from the URL.
                resp = web.HTTPFound(request.rel_url.with_query({k: v for k, v in request.query.items()
                                                                 if k != "token"}))
                resp.set_cookie(TOKEN_COOKIE, query, httponly=True, samesite="Strict", path="/")
                raise resp
            if self.token_ok(bearer) or self.token_ok(request.cookies.get(TOKEN_COOKIE)):
                return await handler(request)
            return web.json_response(
                {"error": "this address needs a read token: `tetherlab ui token` issues one (send it as "
                          "Authorization: Bearer TOKEN, or open /ui/?token=TOKEN once)", "status": 401},
                status=401, headers={"WWW-Authenticate": 'Bearer realm="tetherlab"'})

        return check
