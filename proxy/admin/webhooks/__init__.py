"""Budget-alert webhooks: signed deliveries that are never lost and never sent twice at once.

The request path only *records*: when settle (or a budget PUT) crosses a threshold of a budget
with a webhook URL, ``budget_events.lua`` writes the delivery record and its per-org outbox
entry in the same atomic step as the event. Every proxy process runs one background loop
(``delivery.delivery_ctx``) that delivers from the outbox, so an LLM request never waits on a
receiver.

Redis keys (all under the org's hash tag, so this works on Redis Cluster):

* ``bp:{o:<org>}:outbox`` — ZSET event id → when the entry may next be claimed (ms).
* ``bp:{o:<org>}:wh:<event id>`` — HASH: event, budget (raw JSON, with its webhook secret
  sealed when ``PROXY_SECRET_KEY`` is set, see ``proxy.store.secret_box``), status
  (``pending`` | ``delivered`` | ``failed``), attempts, created_ms, last_error,
  last_attempt_ms, delivered_ms, and the current claim (claim_token, claimed_by,
  claimed_until). Finished records expire after ``record_ttl_hours``.
* ``bp:{o:<org>}:whlog`` — ZSET event id → created_ms: what ``GET /api/v1/webhooks/deliveries``
  lists besides the outbox.

Why it neither loses nor doubles an event: a claim (``webhook_outbox.lua``) atomically takes a
due entry, counts the attempt and moves its score to ``now + claim_timeout_seconds``; no other
process can claim it before then, and ``claim_timeout_seconds`` exceeds the bound on one whole
attempt (``total_timeout_seconds``), so attempts never overlap. A process killed mid-attempt
leaves the entry to be claimed again once its claim expires. Success removes the entry;
failure puts it back at a jittered exponential back-off, until ``max_attempt_hours`` after the
event, when it is marked failed. Delivery is at-least-once: a receiver that answered 2xx
while the sender died before recording it gets the event again, under the same id.

Safety: only http(s); the host is resolved here and the connection goes to the address that
was checked (no DNS-rebinding window). Loopback, private, link-local, multicast, reserved,
unspecified and cloud-metadata addresses are refused — a permanent failure — unless inside
``webhooks.allow_private_targets``; so are IPv6 addresses that embed a refused IPv4 address
(IPv4-mapped and -compatible, 6to4, Teredo, NAT64) and deprecated site-local ones (fec0::/10).
Redirects are not followed (a 3xx is a failed attempt), proxies from the environment are
ignored, and at most 4 KiB of the answer is read.

Verifying a delivery (receiver side, Standard Webhooks; the key is the UTF-8 bytes of the
budget's ``webhook_secret``)::

    signed = f"{headers['webhook-id']}.{headers['webhook-timestamp']}.".encode() + raw_body
    expected = base64.b64encode(hmac.new(secret.encode(), signed, hashlib.sha256).digest())
    ok = any(
        hmac.compare_digest(sig.partition(",")[2].encode(), expected)
        for sig in headers["webhook-signature"].split()
        if sig.startswith("v1,")
    )
    # also: reject timestamps more than ~5 minutes from now, and deduplicate on webhook-id

or, with the ``standardwebhooks`` package (it takes the key base64-encoded)::

    Webhook(base64.b64encode(secret.encode()).decode()).verify(raw_body, headers)

A budget without a secret gets unsigned deliveries (no ``webhook-signature`` header).

The modules: ``signing`` (the body and its signature), ``target`` (which addresses may be
contacted), ``delivery`` (the outbox loop) and ``api`` (``GET /api/v1/webhooks/deliveries``).
"""
