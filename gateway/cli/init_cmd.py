"""``gateway init``: create a node home."""

from __future__ import annotations

from pathlib import Path

import click

from gateway.cli.base import GatewayCommand
from gateway.cli.context import AppContext, pass_app
from gateway.errors import ConfigError
from gateway.node.policy import POLICY_FILE
from gateway.node.runtime import utc_now
from gateway.node.setup import TlsFiles, init_node

__all__ = ["init"]


@click.command(cls=GatewayCommand)
@click.option(
    "--node",
    "node_id",
    type=click.Choice(["jp", "pk"]),
    required=True,
    help="Which contact point this node is: jp (Tokyo) or pk (Islamabad).",
)
@click.option(
    "--listen", metavar="HOST:PORT", help="Peer API listen address (default 127.0.0.1:8701)."
)
@click.option(
    "--api-listen", metavar="HOST:PORT", help="Local API listen address (default 127.0.0.1:8702)."
)
@click.option(
    "--peer-url", metavar="URL", help="Base URL of the peer node, e.g. https://pk.example:8701."
)
@click.option(
    "--db",
    "db_url",
    metavar="URL",
    help="Database URL (default: SQLite file in the home; postgresql://user@host/db for production).",
)
@click.option(
    "--policy-dir",
    type=click.Path(file_okay=False, path_type=Path),
    metavar="DIR",
    help="Folder holding the agreed policy.toml, used as it is and recorded as "
    "[policy] dir (default: <home>/policies, filled from the files shipped with the "
    "package). $GATEWAY_POLICY_DIR overrides both.",
)
@click.option(
    "--tls-cert",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="This node's TLS certificate chain (PEM; serverAuth and clientAuth), copied into the home.",
)
@click.option(
    "--tls-key",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="The certificate's private key (unencrypted PEM), copied into the home with mode 0600.",
)
@click.option(
    "--tls-ca",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="The CA certificate(s) the peer's certificate is checked against (mutual TLS).",
)
@click.option(
    "--insecure-http",
    is_flag=True,
    help="Accept plain HTTP off loopback and an https:// peer URL without TLS material.",
)
@click.option(
    "--admin",
    "admin_name",
    default="admin",
    show_default=True,
    metavar="NAME",
    help="Name of the first administrator (its token is printed once).",
)
@pass_app
def init(
    app: AppContext,
    node_id: str,
    listen: str | None,
    api_listen: str | None,
    peer_url: str | None,
    db_url: str | None,
    policy_dir: Path | None,
    admin_name: str,
    tls_cert: Path | None,
    tls_key: Path | None,
    tls_ca: Path | None,
    insecure_http: bool,
) -> None:
    """Create a new node home: configuration, database, keys and first admin.

    Refuses to touch a home that holds a node already. The node's policy
    comes from the files shipped with the package (copied into
    <home>/policies) unless --policy-dir or GATEWAY_POLICY_DIR names a folder
    holding the agreed policy.toml. With --tls-cert and --tls-key (and
    --tls-ca for mutual TLS) the files are checked (validity, key match,
    usages, the listen host among the certificate's names) and copied into
    <home>/keys/tls; an https:// peer URL without them is refused unless
    --insecure-http.

    \b
    Example:
      gateway init --home /srv/gw-jp --node jp --listen 0.0.0.0:8701 \\
          --peer-url https://pk.example:8701 --db postgresql://gw@db/gateway \\
          --tls-cert jp.crt --tls-key jp.key --tls-ca pair-ca.crt

    Host operation: needs the keystore passphrase.
    """
    home = app.home()
    if policy_dir is not None and not (policy_dir / POLICY_FILE).is_file():
        raise click.BadParameter(
            f"{policy_dir} holds no {POLICY_FILE}; name the folder of the agreed policy files",
            param_hint="--policy-dir",
        )
    if (tls_cert is None) != (tls_key is None):
        raise ConfigError("--tls-cert and --tls-key must be given together", reason="config.tls")
    if tls_ca is not None and tls_cert is None:
        raise ConfigError(
            "--tls-ca needs --tls-cert and --tls-key (mutual TLS needs all three)",
            reason="config.tls",
        )
    tls = TlsFiles(tls_cert, tls_key, tls_ca) if tls_cert and tls_key else None
    result = init_node(
        home,
        node_id,
        now=utc_now(),
        listen=listen,
        api_listen=api_listen,
        peer_url=peer_url,
        db_url=db_url,
        admin_name=admin_name,
        policy_dir=policy_dir.expanduser().resolve() if policy_dir is not None else None,
        environ=dict(app.environ),
        tls=tls,
        insecure_http=insecure_http,
    )
    data = {
        "home": result.home,
        "node": result.node_id,
        "config": result.config_path,
        "database": result.database_url,
        "migrations": result.migrations,
        "made": result.made,
        "admin": result.admin_name,
        "admin_token": result.admin_token,
        **result.facts,
    }

    def human() -> str:
        lines = [
            f"Created node {result.node_id!r} in {result.home}",
            f"  config:     {result.config_path}",
            f"  database:   {result.database_url.split('@')[-1]}",
            f"  migrations: {', '.join(result.migrations) or 'none'}",
        ]
        for key, value in result.facts.items():
            lines.append(f"  {key}: {value}")
        lines += [
            f"  first admin: {result.admin_name}",
            "",
            "Token of the first admin (shown once; keep it secret, e.g. in a 0600 file):",
            f"  {result.admin_token}",
        ]
        return "\n".join(lines)

    app.emit(data, human)
