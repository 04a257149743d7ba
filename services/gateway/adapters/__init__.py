"""The gateway's adapters: PostgreSQL credential store, JWT verification, NATS feeds."""
