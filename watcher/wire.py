"""Facts of the Nucleus wire contract (../shared/nucleus-api.md) that more than one layer checks:
the rules refuse a `remote_url` template that cannot produce one, the client refuses to send one,
and the devserver refuses to store one.

May import: nothing of ours.
"""

from typing import Final

# The schemes an item's image_location may use when the file is not sent in the request.
REMOTE_URL_PREFIXES: Final = ("gs://", "s3://", "http://", "https://")
