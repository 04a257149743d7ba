"""Run the gateway service: `python -m services.gateway`."""

from services.gateway.bootstrap import main

main()
