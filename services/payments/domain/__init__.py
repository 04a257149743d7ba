"""Payments' pure domain: money, the ledger's rules, the checkout saga's states, hold expiry,
catalog rules and ticket codes. No I/O here: adapters store it, the saga drives it."""
