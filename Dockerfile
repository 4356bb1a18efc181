# ssw-gateway node image: one node (jp or pk) per container.
#
#   docker build -t ssw-gateway .
#   docker run --rm ssw-gateway --help
#
# The node home is /var/lib/ssw-gateway (a volume). The package carries the
# default policy files (policies/, installed as package data), so
#   docker run --rm -e GATEWAY_PASSPHRASE=... -v gw-home:/var/lib/ssw-gateway ssw-gateway init --node jp
# works without any mount; the compose deployment mounts the node's keys at
# /var/lib/ssw-gateway/keys and the agreed policies read-only at
# /etc/ssw-gateway/policies. See docker-compose.yml and docs/operations.md.

FROM python:3.11-slim AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY gateway ./gateway
# gateway/policies links to ../policies: the wheel built here carries a copy.
COPY policies ./policies
RUN python -m venv /opt/ssw-gateway \
    && /opt/ssw-gateway/bin/pip install --upgrade pip \
    && /opt/ssw-gateway/bin/pip install .

FROM python:3.11-slim
LABEL org.opencontainers.image.title="ssw-gateway" \
      org.opencontainers.image.description="Signed, encrypted case exchange between the Japan and Pakistan SSW contact points"
ENV PATH=/opt/ssw-gateway/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    GATEWAY_HOME=/var/lib/ssw-gateway
COPY --from=build /opt/ssw-gateway /opt/ssw-gateway
# pg_dump and pg_restore for `gateway backup` / `gateway restore` of a
# PostgreSQL node; the client's major version must be at least the server's.
RUN apt-get update \
    && apt-get install -y --no-install-recommends postgresql-client \
    && rm -rf /var/lib/apt/lists/*
# A fixed, unprivileged uid/gid so host directories (keys/jp, keys/pk) can be
# given to it with `chown 10001:10001`.
RUN groupadd --system --gid 10001 gateway \
    && useradd --system --uid 10001 --gid gateway --home-dir /var/lib/ssw-gateway \
       --shell /usr/sbin/nologin gateway \
    && install -d -o gateway -g gateway -m 0700 /var/lib/ssw-gateway \
    && install -d -o root -g root -m 0755 /etc/ssw-gateway
USER gateway:gateway
WORKDIR /var/lib/ssw-gateway
VOLUME ["/var/lib/ssw-gateway"]
EXPOSE 8701
# Readiness: GET /readyz of the local API (database, keys, policy) needs no
# authentication and reveals only ready/not-ready and the failed checks' names.
# SSW_HEALTH_URL points the probe at https:// when the node serves TLS; the
# probe runs inside the container against its own loopback, sends no
# credential and reads only the status, so it presents the node's certificate
# (should the URL be the peer port's mutual-TLS /v1/health) but does not check
# the name the certificate was issued for.
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import os, ssl, sys, urllib.request as r\nurl = os.environ.get('SSW_HEALTH_URL', 'http://127.0.0.1:8702/readyz')\nctx = None\nif url.startswith('https:'):\n    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)\n    ctx.check_hostname = False\n    ctx.verify_mode = ssl.CERT_NONE\n    cert, key = os.environ.get('GATEWAY_SERVER_TLS_CERT'), os.environ.get('GATEWAY_SERVER_TLS_KEY')\n    if cert and key:\n        ctx.load_cert_chain(cert, key)\nsys.exit(0 if r.urlopen(url, timeout=4, context=ctx).status == 200 else 1)"]
ENTRYPOINT ["gateway"]
CMD ["serve"]
