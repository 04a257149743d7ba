"""The gateway's pure rules: credential tokens, who a credential acts as, idempotency keys."""
