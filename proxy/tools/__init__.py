"""What users run beside the proxy: the mock upstream, the load tester, the demo."""
