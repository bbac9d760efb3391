"""The model table: public names -> routes (upstreams, price, encoding, prompt bounds).

Below the dialects and the gateway, so a dialect can price and count a request without
reaching up into the request path; built once at start-up (``routes.build_routes``).
"""
