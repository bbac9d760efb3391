"""``python -m proxy.tools.mock``: run the mock for demos and load tests."""

from proxy.tools.mock.app import main

main()
