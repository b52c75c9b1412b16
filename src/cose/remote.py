"""Check that a DVC remote is usable before `dvc push` / `dvc pull`.

DVC reports an unreachable S3 endpoint or missing credentials as "unexpected error - Could
not connect to the endpoint URL" or "Unable to locate credentials", without naming the remote
or saying what to change. `check_remote(name)` reads the remote from the merged DVC config
(.dvc/config, .dvc/config.local, user and system levels) and makes one cheap request with the
same settings, raising `RemoteError` with one line that names the remote, the endpoint and
the fix.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

_CREDENTIAL_CODES = {
    "InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken", "ExpiredToken",
    "InvalidClientTokenId", "AuthorizationHeaderMalformed", "TokenRefreshRequired",
}
_DENIED_CODES = {"AccessDenied", "AllAccessDisabled", "403", "Forbidden"}
_CREDENTIALS_HINT = (
    "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or `dvc remote modify --local {name} "
    "access_key_id ...` and `... secret_access_key ...`"
)


class RemoteError(RuntimeError):
    """A DVC remote is not configured, not reachable or refuses our credentials."""


def _open_repo(root: str | Path | None, name: str):
    from dvc.exceptions import NotDvcRepoError
    from dvc.repo import Repo

    try:
        return Repo(str(root) if root is not None else None, uninitialized=False)
    except NotDvcRepoError as exc:
        raise RemoteError(f"remote {name!r}: not inside a DVC repository ({exc})") from None


#: DVC's config levels, the one that wins first, and where each one is
_LEVELS = (("local", ".dvc/config.local"), ("repo", ".dvc/config"),
           ("global", "your user's DVC config"), ("system", "the system's DVC config"))


def default_remote_source(root: str | Path | None = None) -> tuple[str, str]:
    """The DVC default remote (``core.remote``) and the config file that sets it (the
    clone's ``.dvc/config.local`` wins over the committed ``.dvc/config``)."""
    repo = _open_repo(root, "(default)")
    try:
        for level, where in _LEVELS:
            name = repo.config.load_one(level).get("core", {}).get("remote")
            if name:
                return str(name), where
    finally:
        repo.close()
    raise RemoteError("no default DVC remote; name one, or set it with "
                      "`dvc remote default NAME`")


def default_remote(root: str | Path | None = None) -> str:
    """The name of the DVC default remote (`core.remote`)."""
    return default_remote_source(root)[0]


def remote_config(name: str, root: str | Path | None = None) -> dict[str, Any]:
    """The merged DVC config of remote `name` (relative local paths made absolute)."""
    repo = _open_repo(root, name)
    try:
        remotes = dict(repo.config.get("remote", {}))
    finally:
        repo.close()
    if name not in remotes:
        known = ", ".join(sorted(remotes)) or "none"
        raise RemoteError(
            f"remote {name!r} is not configured (configured: {known}); "
            f"add it with `dvc remote add {name} URL`"
        )
    return dict(remotes[name])


def check_remote(name: str, root: str | Path | None = None, timeout_s: float = 5.0) -> None:
    """Raise `RemoteError` naming remote `name` unless it can be listed with its settings."""
    conf = remote_config(name, root)
    url = str(conf.get("url", ""))
    scheme = url.split("://", 1)[0] if "://" in url else ""
    if scheme == "s3":
        _check_s3(name, url, conf, timeout_s)
    elif scheme in ("", "file"):
        _check_local(name, url.removeprefix("file://"))
    # other schemes (gs, azure, ssh, http...): nothing cheap and general to check here


def _check_local(name: str, path: str) -> None:
    p = Path(path)
    fix = f"create it, or point the remote elsewhere: `dvc remote modify --local {name} url PATH`"
    if not p.exists():
        raise RemoteError(f"remote {name!r}: directory {p} does not exist ({fix})")
    if not p.is_dir():
        raise RemoteError(f"remote {name!r}: {p} is not a directory ({fix})")
    if not os.access(p, os.R_OK | os.W_OK | os.X_OK):
        raise RemoteError(f"remote {name!r}: directory {p} is not readable and writable ({fix})")


def _endpoint(conf: dict[str, Any]) -> str | None:
    return (
        conf.get("endpointurl")
        or os.environ.get("AWS_ENDPOINT_URL_S3")
        or os.environ.get("AWS_ENDPOINT_URL")
        or None
    )


def _check_s3(name: str, url: str, conf: dict[str, Any], timeout_s: float) -> None:
    import botocore.session
    from botocore.config import Config
    from botocore.exceptions import (
        BotoCoreError,
        ClientError,
        EndpointConnectionError,
        NoCredentialsError,
        PartialCredentialsError,
    )

    bucket, _, prefix = url.removeprefix("s3://").partition("/")
    endpoint = _endpoint(conf)
    where = endpoint or "AWS S3"
    session = botocore.session.Session(profile=conf.get("profile"))
    if conf.get("credentialpath"):
        session.set_config_variable("credentials_file", str(conf["credentialpath"]))
    verify: Any = conf.get("ssl_verify", True)
    if conf.get("use_ssl") is False:
        verify = False
    client_kwargs: dict[str, Any] = {
        "endpoint_url": endpoint,
        "region_name": conf.get("region") or session.get_config_variable("region"),
        "verify": verify,
        "config": Config(
            connect_timeout=timeout_s, read_timeout=timeout_s,
            retries={"max_attempts": 1, "mode": "standard"},
        ),
    }
    if conf.get("access_key_id") or conf.get("secret_access_key"):
        client_kwargs.update(
            aws_access_key_id=conf.get("access_key_id"),
            aws_secret_access_key=conf.get("secret_access_key"),
            aws_session_token=conf.get("session_token"),
        )
    hint = _CREDENTIALS_HINT.format(name=name)
    try:
        client = session.create_client("s3", **client_kwargs)
        client.list_objects_v2(Bucket=bucket, Prefix=prefix, MaxKeys=1)
    except EndpointConnectionError as exc:
        reason = _reason(exc)
        raise RemoteError(
            f"remote {name!r}: cannot reach endpoint {where} ({reason}); check the endpoint "
            f"(`dvc remote modify --local {name} endpointurl URL` or AWS_ENDPOINT_URL_S3) and "
            f"that the server is up"
        ) from None
    except (NoCredentialsError, PartialCredentialsError) as exc:
        raise RemoteError(f"remote {name!r}: no S3 credentials ({exc}); {hint}") from None
    except ClientError as exc:
        err = exc.response.get("Error", {})
        code = str(err.get("Code", "")) or str(
            exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", "")
        )
        if code in _CREDENTIAL_CODES:
            raise RemoteError(
                f"remote {name!r}: credentials rejected by {where} ({code}); {hint}"
            ) from None
        if code in _DENIED_CODES:
            raise RemoteError(
                f"remote {name!r}: access denied to s3://{bucket} at {where} ({code}); "
                f"the credentials are valid but lack permission, or they are wrong; {hint}"
            ) from None
        if code in ("NoSuchBucket", "404", "NotFound"):
            raise RemoteError(
                f"remote {name!r}: bucket {bucket!r} does not exist at {where}; create it "
                f"(the compose stack's bucket-init job does) or fix the url with "
                f"`dvc remote modify {name} url s3://BUCKET/PATH`"
            ) from None
        raise RemoteError(f"remote {name!r}: {where} answered {code}: {err.get('Message', exc)}"
                          ) from None
    except (BotoCoreError, ValueError) as exc:
        raise RemoteError(f"remote {name!r}: {where}: {type(exc).__name__}: {exc}") from None


def _reason(exc: Exception) -> str:
    """The innermost cause, shortened ('connection refused', 'timed out', ...)."""
    inner: BaseException = exc
    while inner.__cause__ is not None or inner.__context__ is not None:
        inner = inner.__cause__ or inner.__context__  # type: ignore[assignment]
    text = str(inner).lower()
    for needle, short in (
        ("refused", "connection refused"),
        ("timed out", "timed out"),
        ("name or service not known", "unknown host"),
        ("nodename nor servname", "unknown host"),
        ("temporary failure in name resolution", "unknown host"),
        ("no route to host", "no route to host"),
    ):
        if needle in text:
            return short
    return str(inner) or type(inner).__name__
