"""The benchmark's py-spy summary: shares by component and by proxy function."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent / "bench"))

import cpu_profile

RAW = """\
<module> (proxy/__main__.py:3);serve (proxy/serving.py:110);handle_llm (proxy/llm_api.py:180);count_prompt (proxy/tokenizer.py:40);encode_ordinary (tiktoken/core.py:90) 30
<module> (proxy/__main__.py:3);serve (proxy/serving.py:110);handle_llm (proxy/llm_api.py:190);execute (proxy/resp.py:105) 20
<module> (proxy/__main__.py:3);serve (proxy/serving.py:110);RequestHandler.start (aiohttp/web_protocol.py:686) 40
<module> (proxy/__main__.py:3);run (asyncio/runners.py:118) 10
garbage line without a count
"""  # noqa: E501


def test_summary_splits_self_time_by_component_and_counts_proxy_functions_once(
    tmp_path: Path,
) -> None:
    raw = tmp_path / "raw.txt"
    raw.write_text(RAW)
    summary = cpu_profile.summarise(raw)
    assert summary["samples"] == 100
    assert summary["self_pct_by_component"] == {
        "aiohttp": 40.0,
        "tiktoken": 30.0,
        "proxy.resp": 20.0,
        "event loop": 10.0,
    }
    inclusive = summary["inclusive_pct_proxy_functions"]
    assert isinstance(inclusive, dict)
    assert inclusive["__main__.<module>"] == 100.0
    assert inclusive["llm_api.handle_llm"] == 50.0
    assert inclusive["tokenizer.count_prompt"] == 30.0
    text = cpu_profile.render("short / proxy", summary)
    assert "40.0%  aiohttp" in text and "50.0%  llm_api.handle_llm" in text
