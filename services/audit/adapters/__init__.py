"""The audit service's ways out: PostgreSQL (records, chain heads) and JetStream (consumer lag)."""
