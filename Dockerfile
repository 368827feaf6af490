FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

RUN useradd --system --uid 10001 --user-group --no-create-home --shell /usr/sbin/nologin gateway

WORKDIR /app
COPY pyproject.toml ./
COPY gateway ./gateway
RUN pip install . && rm -rf /app/build

USER gateway

# Listen on all interfaces inside the container, on 8080 whatever the config says (publish it as you like).
ENV GATEWAY_HOST=0.0.0.0 \
    GATEWAY_PORT=8080
EXPOSE 8080

# Ready = the process answers and its Redis does (/readyz is 503 while the store is unreachable).
HEALTHCHECK --interval=10s --timeout=3s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import urllib.request as u; u.urlopen('http://127.0.0.1:8080/readyz', timeout=2)"]

# Nothing secret is baked into the image. Mount a folder at /etc/gateway holding
# config.yaml plus the files it names (the directory file and the Ed25519 assertion key;
# relative paths resolve against that folder), e.g.
#   docker run -v "$PWD/deploy:/etc/gateway:ro" -e GATEWAY_REDIS_URL=redis://redis:6379/0 -p 8080:8080 IMAGE
# Use a real Redis here: the embedded store is a dev-only, single-process store.
CMD ["impersonation-gateway", "serve", "--config", "/etc/gateway/config.yaml"]
