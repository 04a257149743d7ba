"""Run the audit service: `python -m services.audit`."""

from services.audit.bootstrap import main

main()
