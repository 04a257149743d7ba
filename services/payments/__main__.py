"""Run the payments service: `python -m services.payments`."""

from services.payments.bootstrap import main

main()
