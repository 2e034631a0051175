"""Bearer tokens: random, shown once, stored as sha256 (they carry 256 bits of entropy, so no salt/KDF needed)."""
from __future__ import annotations

import hashlib
import secrets

# device: syncs its results; reviewer: reads every result; publisher: uploads models that devices install.
TOKEN_PREFIX = {"device": "red_", "reviewer": "rer_", "publisher": "rep_"}
ROLES = tuple(TOKEN_PREFIX)


def new_token(role: str) -> str:
    return TOKEN_PREFIX[role] + secrets.token_urlsafe(32)


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()
