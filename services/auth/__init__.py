"""Authentication for the web servers (viewer and recorder), written once.

Users, roles and API tokens live in the recorder's database (directory.py); passwords are
argon2 hashes, API tokens are stored as SHA-256 digests only. A browser holds a signed,
expiring session (a JWT, HS256, in an HttpOnly cookie, tokens.py) that both servers verify
with the shared signing key; scripts send ``Authorization: Bearer ...`` (an API token or a
session). gate.py turns a request's headers into a Principal or a refusal, the same way
in both servers. See docs/security.md.
"""
