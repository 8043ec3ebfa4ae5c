"""Alix webhooks: `verify` turns a signed TopupCard body into a `TopupEvent` (or rejects it),
`receive` serves `POST /webhooks/alix` and settles pending rows in the ledger from them.
"""
