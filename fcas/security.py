"""Input hygiene: ids that become file names, output URIs confined to a run's root, and configs
that must not carry credentials.

* :func:`check_id` refuses an id (from a manifest or a config) that is not a plain file-name
  component: only ``[A-Za-z0-9._-]``, no leading dot, no ``..``, at most :data:`MAX_ID_LEN`
  characters. :func:`sanitize_id` turns a source file name into such an id (prepare derives case
  ids from file names; there a bad character is replaced, not refused).
* :func:`safe_child` joins file-name components onto a run root (local path, ``file://`` or
  ``s3://``) and refuses anything that could land outside it: absolute or protocol parts, ``..``,
  backslashes, percent escapes (``%2e%2e``, ``%2f``), control characters, and, for local roots,
  a symlink on the way that leads out of the root.
* :func:`find_credentials` / :func:`refuse_credentials` scan a (Hydra) config for credential keys
  (``aws_secret_access_key``, ``awsSecretAccessKey``, ``secret``, ``token``, ``password``, ...; with a
  value, a nested dict or list included), values that look like AWS access keys or secret keys, URIs
  with a ``user:password@`` part, ``Bearer`` tokens, and ``${oc.env:...}`` interpolations of
  credential variables. :func:`credential_overrides` / :func:`refuse_credential_overrides` do the
  same on raw command-line overrides, before Hydra can echo them (every ``jobs/*.py`` runs it, see
  :func:`fcas.cli.user_errors`). Credentials come from the environment only (see
  :mod:`fcas.io.storage`); the errors name the config path or override key, never the value.

Hand-written: nothing in MONAI, fsspec or Hydra does these checks.
"""
from __future__ import annotations

import hashlib
import os
import posixpath
import re
from typing import Any, Iterator, Mapping, Sequence

from fsspec.core import split_protocol

from fcas.io import storage

__all__ = [
    "MAX_ID_LEN",
    "UnsafePathError",
    "CredentialsInConfigError",
    "check_id",
    "sanitize_id",
    "safe_child",
    "find_credentials",
    "refuse_credentials",
    "credential_overrides",
    "refuse_credential_overrides",
]

MAX_ID_LEN = 128
_ID_OK = re.compile(r"[A-Za-z0-9._-]+")
_ID_BAD_CHARS = re.compile(r"[^A-Za-z0-9._-]+")


class UnsafePathError(ValueError):
    """An id or output path that could escape the run's root or is not a plain file name."""


class CredentialsInConfigError(ValueError):
    """A config that holds credentials (which must come from the environment)."""


def _shown(value: Any, limit: int = 80) -> str:
    text = repr(str(value))
    return text if len(text) <= limit else text[:limit] + "...'"


def check_id(value: Any, what: str = "id") -> str:
    """``value`` as a string if it is a safe file-name component, else :class:`UnsafePathError`.

    Safe: 1..MAX_ID_LEN characters of ``[A-Za-z0-9._-]``, not starting with ``.``, without ``..``.
    """
    text = str(value)
    if not text:
        raise UnsafePathError(f"{what} is empty")
    if len(text) > MAX_ID_LEN:
        raise UnsafePathError(f"{what} {_shown(text)} is {len(text)} characters long, more than {MAX_ID_LEN}")
    if not _ID_OK.fullmatch(text):
        bad = sorted({c for c in text if not _ID_OK.fullmatch(c)})
        raise UnsafePathError(f"{what} {_shown(text)} holds characters {bad} outside [A-Za-z0-9._-]")
    if text.startswith("."):
        raise UnsafePathError(f"{what} {_shown(text)} starts with a dot")
    if ".." in text:
        raise UnsafePathError(f"{what} {_shown(text)} contains '..'")
    return text


def sanitize_id(name: str) -> str:
    """A safe id (passes :func:`check_id`) derived from a source file name.

    The last path component, without ``.nii`` / ``.nii.gz``; runs of characters outside
    ``[A-Za-z0-9._-]`` and runs of dots become ``_``; leading/trailing ``._`` are stripped; an id
    longer than :data:`MAX_ID_LEN` is cut and ends with 8 hex digits of the full name's sha256 so
    that two long names stay distinct. ``ValueError`` when nothing usable is left.
    """
    base = re.split(r"[/\\]", str(name))[-1]
    stem = re.sub(r"\.nii(\.gz)?$", "", base, flags=re.IGNORECASE)
    cid = _ID_BAD_CHARS.sub("_", stem)
    cid = re.sub(r"\.{2,}", "_", cid).strip("._")
    if not cid:
        raise ValueError(f"cannot derive an id from {_shown(name)}")
    if len(cid) > MAX_ID_LEN:
        cid = cid[: MAX_ID_LEN - 9].rstrip("._") + "-" + hashlib.sha256(str(name).encode()).hexdigest()[:8]
    return check_id(cid, "derived id")


def _check_component(part: str, root: str) -> None:
    if part in ("", ".", ".."):
        raise UnsafePathError(f"path component {part!r} under {root} is not a file name")
    if "%" in part:
        raise UnsafePathError(f"path component {_shown(part)} under {root} holds a percent escape")
    if "\\" in part or any(ord(c) < 32 or ord(c) == 127 for c in part):
        raise UnsafePathError(f"path component {_shown(part)} under {root} holds a backslash or control character")
    check_id(part, f"path component under {root}")


def safe_child(root: str | os.PathLike, *parts: str) -> str:
    """``root`` joined with ``parts`` (as :func:`fcas.io.storage.join`), refused if it may leave ``root``.

    Each part may hold ``/``-separated components; every component must pass :func:`check_id`
    (so no ``..``, no leading dot, no ``%``, ``\\`` or control characters), and a part may not be
    absolute or carry a protocol. For local roots the deepest existing path on the way (the file
    itself included) is resolved with ``os.path.realpath`` and must stay inside the resolved root,
    so a symlinked sub-folder or file pointing elsewhere is refused too. Raises :class:`UnsafePathError` naming the part.
    """
    root = os.fspath(root)
    if not parts:
        raise UnsafePathError(f"safe_child needs at least one part under {root}")
    for part in parts:
        part = os.fspath(part)
        if not isinstance(part, str):
            raise UnsafePathError(f"path part {part!r} under {root} is not a string")
        protocol, _ = split_protocol(part)
        if part.startswith(("/", "~")) or protocol is not None or re.match(r"^[A-Za-z]:", part):
            raise UnsafePathError(f"path part {_shown(part)} under {root} must be relative")
        for comp in part.split("/"):
            _check_component(comp, root)
    uri = storage.join(root, *parts)
    if storage.is_local(root):
        _, root_path = storage.get_fs(root)   # absolute local paths
        _, child_path = storage.get_fs(uri)
    else:                                     # bucket/key, without building a filesystem object
        root_path, child_path = split_protocol(root)[1], split_protocol(uri)[1]
    root_path = root_path.rstrip("/") or "/"
    norm = posixpath.normpath(child_path)
    if not (norm == root_path or norm.startswith(root_path.rstrip("/") + "/")):
        raise UnsafePathError(f"output {uri} is outside the run root {root}")
    if storage.is_local(root) and os.path.exists(root_path):
        # a symlink on the way (an existing sub-folder or the file itself) must not lead out of the root
        real_root = os.path.realpath(root_path)
        probe = child_path
        while not os.path.lexists(probe) and probe != root_path:
            probe = os.path.dirname(probe)
        real = os.path.realpath(probe)
        if os.path.commonpath([real_root, real]) != real_root:
            raise UnsafePathError(f"output {uri} resolves to {real}, outside the run root {real_root} (a symlink?)")
    return uri


# ---- credentials -------------------------------------------------------------------------------
_CRED_KEYS = {
    "key", "secret", "token", "password", "passwd", "pwd", "credentials", "credential", "authorization",
    "access_key", "access_key_id", "secret_key", "secret_access_key", "session_token", "security_token",
    "aws_access_key_id", "aws_secret_access_key", "aws_session_token", "aws_security_token",
    "api_key", "apikey", "client_secret", "private_key", "auth_token", "bearer_token", "access_token",
    "refresh_token", "id_token",
}
_CRED_SUFFIXES = ("_secret", "_password", "_passwd", "_token", "_secret_key", "_access_key",
                  "_access_key_id", "_api_key", "_private_key", "_credentials")
# the same names written without separators ("secretkey", "accesstoken", "awssecretaccesskey")
_CRED_COMPACT = {k.replace("_", "") for k in _CRED_KEYS}
_CRED_COMPACT_SUFFIXES = tuple(s.replace("_", "") for s in _CRED_SUFFIXES)
_CRED_ENV = re.compile(r"\$\{\s*oc\.env\s*:\s*([A-Za-z_]*(?:SECRET|TOKEN|PASSWORD|PASSWD|ACCESS_KEY|API_KEY)[A-Za-z_]*)",
                       re.IGNORECASE)
_AWS_KEY_ID = re.compile(r"(?<![A-Z0-9])(?:AKIA|ASIA|AIDA|AROA|AIPA|ANPA|ANVA|AGPA)[A-Z0-9]{16}(?![A-Z0-9])")
_SECRET_LIKE = re.compile(r"(?<![A-Za-z0-9/+=])[A-Za-z0-9/+]{40}(?![A-Za-z0-9/+=])")
_URI_USERINFO = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^/?#@\s]*:[^/?#@\s]*@")   # anywhere in the text
_BEARER = re.compile(r"\bbearer\s+[A-Za-z0-9._~+/=-]{8,}", re.IGNORECASE)
# "name: value" / "name=value" inside a string (a dict or list written on the command line, a header);
# an empty value, null or '' does not count
_EMBEDDED_KEY = re.compile(r"(?<![\w-])([A-Za-z_][\w-]*)['\"]?\s*[:=]\s*(?!null\b|none\b|~|''|\"\"|[,}\]\s]|$)",
                           re.IGNORECASE)


def _is_cred_key(key: Any) -> bool:
    """``aws_secret_access_key``, ``awsSecretAccessKey``, ``AWS-SECRET-ACCESS-KEY``, ``secretkey``, ``db_password``"""
    k = re.sub(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])", "_", str(key))   # camelCase -> camel_Case
    k = re.sub(r"[^a-z0-9]+", "_", k.lower()).strip("_")
    compact = k.replace("_", "")
    return (k in _CRED_KEYS or k.endswith(_CRED_SUFFIXES)
            or compact in _CRED_COMPACT or compact.endswith(_CRED_COMPACT_SUFFIXES))


def _looks_like_secret(text: str) -> bool:
    """A 40-character AWS-secret-shaped token: base64 alphabet, both cases and a digit (not hex)."""
    for m in _SECRET_LIKE.finditer(text):
        tok = m.group(0)
        if tok.startswith("/") or tok.endswith("/") or tok.count("/") > 3:
            continue   # a path segment run, not a key
        if re.search(r"[a-z]", tok) and re.search(r"[A-Z]", tok) and re.search(r"[0-9]", tok):
            return True
    return False


def _value_finding(text: str) -> str | None:
    """Why the string ``text`` holds (or pulls in) a credential, or None."""
    if _CRED_ENV.search(text):
        return "interpolates a credential environment variable"
    if _AWS_KEY_ID.search(text):
        return "value looks like an AWS access key id"
    if _URI_USERINFO.search(text):
        return "URI with user:password@"
    if _BEARER.search(text):
        return "bearer token"
    if any(_is_cred_key(m.group(1)) for m in _EMBEDDED_KEY.finditer(text)):
        return "holds a credential key with a value"
    if _looks_like_secret(text):
        return "value looks like a 40-character secret key"
    return None


def _filled(value: Any) -> bool:
    """A value that is not empty: not None/'' and, for a dict or list, some leaf that is not empty."""
    if isinstance(value, Mapping):
        return any(_filled(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return any(_filled(v) for v in value)
    return value not in (None, "")


def _walk(node: Any, path: str) -> Iterator[tuple[str, Any, Any]]:
    if isinstance(node, Mapping):
        for k, v in node.items():
            yield from _walk(v, f"{path}.{k}" if path else str(k))
            yield (f"{path}.{k}" if path else str(k)), k, v
    elif isinstance(node, (list, tuple)):
        for i, v in enumerate(node):
            yield from _walk(v, f"{path}[{i}]")
    else:
        yield path, None, node


def find_credentials(config: Any) -> list[str]:
    """Config paths that hold (or pull in) credentials, each with why: ``["s3.secret: credential key", ...]``.

    ``config``: a mapping (a plain dict or an OmegaConf ``DictConfig``; walked unresolved, so an
    ``${oc.env:AWS_SECRET_ACCESS_KEY}`` interpolation is caught without reading the variable).
    A credential key (any case or spelling, ``awsSecretAccessKey`` too) counts when its value is
    not empty, a dict or list with a non-empty leaf included; keys with an empty/None value are
    allowed (a template may name them to say "from the environment"). String values are searched
    for access keys, secret-shaped tokens, ``user:password@`` in any URI, ``Bearer`` tokens and
    ``name: value`` pairs of credential names. The messages never contain a value.
    """
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf

        if isinstance(config, (DictConfig, ListConfig)):
            config = OmegaConf.to_container(config, resolve=False)
    except ImportError:  # pragma: no cover - omegaconf comes with hydra
        pass
    found: list[str] = []
    for path, key, value in _walk(config, ""):
        if key is not None:
            if _is_cred_key(key) and _filled(value):
                found.append(f"{path}: credential key")
            continue
        why = _value_finding(value) if isinstance(value, str) else None
        if why:
            found.append(f"{path}: {why}")
    return sorted(set(found))


def refuse_credentials(config: Any, source: str = "config") -> None:
    """Raise :class:`CredentialsInConfigError` when :func:`find_credentials` finds anything."""
    found = find_credentials(config)
    if found:
        raise CredentialsInConfigError(
            f"{source} holds credentials ({'; '.join(found)}); remove them and set them in the environment "
            "instead (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN, or a profile / instance role)"
        )


def credential_overrides(args: Sequence[str]) -> list[str]:
    """The command-line arguments (Hydra overrides such as ``+a.b=v``, flags) that carry credentials,
    each as ``"<key>=<redacted> (<why>)"``: the key named, the value never.

    Meant for ``sys.argv[1:]`` before Hydra parses it: Hydra echoes override values in its errors
    ("Could not override 'aws_secret_access_key'", "Error executing job with overrides: [...]") and
    saves them to ``.hydra/overrides.yaml``. Works on the raw text, so an override Hydra could not
    parse is checked too: a credential key anywhere in the key path with a non-empty value, and
    the value (or a flag / bare argument) searched as :func:`find_credentials` searches strings.
    """
    found: list[str] = []
    for i, arg in enumerate(args, start=1):
        key, sep, value = str(arg).partition("=")
        if sep and not key.startswith("-"):
            parts = re.split(r"[./]", key.lstrip("+~").split("@", 1)[0])
            filled = value.strip() not in ("", "null", "''", '""', "[]", "{}")
            why = "credential key" if filled and any(_is_cred_key(p) for p in parts) else _value_finding(value)
            shown = key
        else:                        # --config-dir=DIR, -cd DIR, a bare value
            why = _value_finding(str(arg))
            shown = key if sep else f"argument {i}"
        if why:
            found.append(f"{shown}=<redacted> ({why})" if sep else f"{shown} <redacted> ({why})")
    return found


def refuse_credential_overrides(args: Sequence[str]) -> None:
    """:class:`CredentialsInConfigError` naming (never showing) the arguments :func:`credential_overrides` finds."""
    found = credential_overrides(args)
    if found:
        raise CredentialsInConfigError(
            f"{'; '.join(found)}: credentials do not belong in overrides; use the environment "
            "(AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN) / an AWS profile or instance role"
        )
