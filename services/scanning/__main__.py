"""Run the scanning service: `python -m services.scanning`."""

from services.scanning.bootstrap import main

main()
