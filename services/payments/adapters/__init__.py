"""Payments' adapters: PostgreSQL storage, the payment-processor port and its fake, and the
test-only fault injection."""
