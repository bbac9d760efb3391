# llm-proxy image. Build: docker build -t llm-budget-proxy .
# Run:   docker run -p 8080:8080 -e REDIS_URL=redis://host:6379/0 -e OPENAI_API_KEY=... \
#               -e PROXY_ADMIN_KEY=... llm-budget-proxy
# Without REDIS_URL the proxy starts its embedded redis-server (data in /app/.proxy-data).

# --- builder: the package and its dependencies in a self-contained venv --------------------------
FROM python:3.11-slim AS builder
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
COPY pyproject.toml README.md ./
COPY proxy ./proxy
RUN pip install . \
 && python -c "from proxy.catalog.tokenizer import get_encoding; get_encoding('o200k_base'); get_encoding('cl100k_base')" \
 && llm-proxy serve --help >/dev/null

# --- final: the venv, the default config, a non-root user -----------------------------------------
FROM python:3.11-slim
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PROXY_CONFIG=/etc/llm-proxy/proxy.toml
RUN useradd --system --uid 10001 --user-group --create-home --home-dir /app llmproxy
COPY --from=builder /opt/venv /opt/venv
COPY config/proxy.toml /etc/llm-proxy/proxy.toml
WORKDIR /app
USER llmproxy
EXPOSE 8080
# No curl in slim images: ask /readyz (Redis reachable, scripts loaded) with Python itself.
HEALTHCHECK --interval=10s --timeout=3s --start-period=15s --retries=3 \
  CMD ["python", "-c", "import os, sys, urllib.request; port = os.environ.get('PROXY__SERVER__PORT', '8080'); sys.exit(0 if urllib.request.urlopen(f'http://127.0.0.1:{port}/readyz', timeout=2).status == 200 else 1)"]
ENTRYPOINT ["llm-proxy"]
CMD ["serve", "--host", "0.0.0.0"]
