"""Run by ``test_mka1_client.py`` with the MKA1 client's own virtualenv (``meetkai-mka1==0.6.10``
pins pydantic): calls every usage and pricing operation the proxy serves through the generated
client, unchanged, and prints one JSON object of what the client parsed (or the status of the
error it raised). Standard library and the client only.

    python mka1_usage_calls.py URL ADMIN_KEY ORG_ADMIN_KEY MEMBER_KEY START END NOW
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from typing import Any

from meetkai_mka1 import SDK, errors


def parsed(call: Callable[[], Any]) -> Any:
    """What the client made of the answer: its model as JSON, or the error's status."""
    try:
        result = call()
    except errors.SDKError as exc:
        return {"error": exc.status_code, "body": exc.body}
    return result.model_dump(mode="json", by_alias=True)


def main() -> None:
    url, admin_key, org_admin_key, member_key = sys.argv[1:5]
    start, end, now = (int(arg) for arg in sys.argv[5:8])
    admin = SDK(bearer_auth=admin_key, server_url=url)
    org_admin = SDK(bearer_auth=org_admin_key, server_url=url)
    member = SDK(bearer_auth=member_key, server_url=url)
    usage, models = admin.llm.usage, admin.llm.models
    out: dict[str, Any] = {}

    out["costs"] = parsed(lambda: usage.costs(start_time=start, end_time=end))
    out["costs_by_key"] = parsed(
        lambda: usage.costs(start_time=start, end_time=end, group_by="api_key_id")
    )
    out["costs_by_all"] = parsed(
        lambda: usage.costs(
            start_time=start,
            end_time=end,
            group_by=["model", "api_key_id", "team_id", "external_user_id", "org_id"],
        )
    )
    out["costs_acme"] = parsed(
        lambda: usage.costs(start_time=start, end_time=end, org_id="acme", group_by="org_id")
    )
    out["costs_alice"] = parsed(
        lambda: usage.costs(
            start_time=start, end_time=end, group_by="external_user_id", x_on_behalf_of="alice"
        )
    )
    out["completions_1h"] = parsed(
        lambda: usage.completions(
            start_time=start,
            end_time=end,
            bucket_width="1h",
            group_by=["model", "api_key_id"],
            models=["gpt-4o", "gpt-4o-mini"],
            org_ids="acme",
        )
    )
    out["completions_1m"] = parsed(
        lambda: usage.completions(
            start_time=now - 1800, end_time=now + 60, bucket_width="1m", group_by="org_id"
        )
    )
    pages = []
    page = None
    while True:
        answer = usage.completions(
            start_time=start - 4 * 86400,
            end_time=end,
            limit=2,
            page=page,
            group_by="model",
            external_user_ids=["alice", "bob"],
            all_orgs="true",
        )
        pages.append(answer.model_dump(mode="json", by_alias=True))
        if not answer.has_more:
            break
        page = answer.next_page
    out["completions_pages"] = pages
    out["embeddings"] = parsed(lambda: usage.embeddings(start_time=start, group_by="model"))
    out["responses"] = parsed(
        lambda: usage.responses(
            start_time=start,
            end_time=end,
            group_by=["background", "model", "user_id"],
            background=False,
            org_ids=["acme", "globex"],
        )
    )
    out["prices"] = parsed(lambda: models.list_cluster_prices())
    out["price_gpt4o"] = parsed(lambda: models.list_cluster_prices(model="gpt-4o"))
    out["org_prices"] = parsed(lambda: models.list_org_prices(org_id="acme"))
    out["currency"] = parsed(lambda: models.get_cluster_currency())
    out["set_price"] = parsed(
        lambda: models.set_cluster_price(model="gpt-4o", rates={"input_tokens": 1e-06})
    )
    out["clear_price"] = parsed(lambda: models.clear_cluster_price(model="gpt-4o"))
    out["set_org_price"] = parsed(
        lambda: models.set_org_price(org_id="acme", model="gpt-4o", rates={"input_tokens": 1e-06})
    )
    out["clear_org_price"] = parsed(lambda: models.clear_org_price(org_id="acme", model="gpt-4o"))
    out["set_currency"] = parsed(lambda: models.set_cluster_currency(currency="EUR"))
    # Who may read: an org admin their org (another org is refused); a member nothing.
    out["org_admin_costs"] = parsed(
        lambda: org_admin.llm.usage.costs(start_time=start, end_time=end, group_by="org_id")
    )
    out["org_admin_other_org"] = parsed(
        lambda: org_admin.llm.usage.costs(start_time=start, end_time=end, org_id="globex")
    )
    out["org_admin_other_org_ids"] = parsed(
        lambda: org_admin.llm.usage.completions(start_time=start, org_ids="globex")
    )
    out["member_costs"] = parsed(lambda: member.llm.usage.costs(start_time=start, end_time=end))
    out["member_prices"] = parsed(lambda: member.llm.models.list_cluster_prices())
    print(json.dumps(out))


if __name__ == "__main__":
    main()
