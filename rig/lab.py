"""``boards.yaml`` → a validated :class:`Lab`.

One file describes the lab (its name, the cloud stack the boards talk to, the Wi-Fi
access points they may join, where traffic is captured, the supplier's product
declaration, where reports go) and the farm (the boards). Everything downstream —
the CLI, the pytest fixtures, the evidence manifest — reads the lab only through
this model, so a bad file is caught here, once, with a message that names the file,
the line, the key and the fix.

Secrets (Wi-Fi passphrases) may be written as ``env:VAR`` and are resolved from the
environment at load time; they are held as :class:`pydantic.SecretStr`, so they never
print, and :meth:`Lab.redacted` is what evidence records of the configuration.
"""

from __future__ import annotations

import ipaddress
import os
import re
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from rig.boards.virtual_ports import (
    RadioAuth,
    RadioNetwork,
    check_virtual_address,
    default_board_address,
    published_address,
    published_port,
    radio_network,
)
from rig.targets import SUPPORTED as SUPPORTED_CHIPS

DEFAULT_BOARDS_FILE = "boards.yaml"
ENV_PREFIX = "env:"
REDACTED = "***"

_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,31}$")
_MAC_RE = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")
_RFC2217_RE = re.compile(r"^rfc2217://(?P<host>[^:/\s]+):(?P<port>\d{1,5})(?:\?.*)?$")


class LabConfigError(Exception):
    """``boards.yaml`` cannot be used. ``str()`` is the whole message, one line per problem."""

    def __init__(self, path: Path | str, problems: Sequence[str]):
        self.path = Path(path)
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


class _LocatedError(ValueError):
    """A whole-lab rule broken at one place; *loc* lets the loader name that line."""

    def __init__(self, message: str, loc: tuple[int | str, ...]):
        super().__init__(message)
        self.loc = loc


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# --------------------------------------------------------------------------- secrets


def resolve_secret(value: str, what: str) -> str:
    """Resolve ``env:VAR`` to the variable's value; anything else is a literal."""
    if not value.startswith(ENV_PREFIX):
        return value
    var = value[len(ENV_PREFIX):].strip()
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", var):
        raise ValueError(f"'{value}' is not a valid env reference. Fix: write env:NAME with a shell variable name")
    if var not in os.environ:
        raise ValueError(
            f"{what} comes from environment variable {var}, which is not set. "
            f"Fix: export {var}=... before running (or in the CI job's secrets)"
        )
    return os.environ[var]


# --------------------------------------------------------------------------- lab parts


class WifiNetwork(_Strict):
    """An access point boards may join. For virtual boards it is the emulated radio."""

    ssid: Annotated[str, Field(min_length=1, max_length=32)]
    passphrase: SecretStr = SecretStr("")
    auth: RadioAuth = "wpa2_psk"
    channel: Annotated[int, Field(ge=1, le=14)] = 6
    from_env: bool = Field(default=False, exclude=True)

    @model_validator(mode="before")
    @classmethod
    def _resolve(cls, data: Any) -> Any:
        if isinstance(data, Mapping) and isinstance(data.get("passphrase"), str):
            raw = data["passphrase"]
            data = dict(data)
            data["from_env"] = raw.startswith(ENV_PREFIX)
            data["passphrase"] = resolve_secret(raw, f"passphrase of Wi-Fi '{data.get('ssid', '?')}'")
        return data

    @model_validator(mode="after")
    def _check_length(self) -> WifiNetwork:
        secret = self.passphrase.get_secret_value()
        if self.auth == "open" and secret:
            raise ValueError("an open network has no passphrase. Fix: remove passphrase or set auth: wpa2_psk")
        if self.auth != "open" and not 8 <= len(secret) <= 63:
            raise ValueError(
                "a WPA passphrase is 8 to 63 characters (IEEE 802.11i). Fix: correct the passphrase or set auth: open"
            )
        return self


class StackConfig(_Strict):
    """Which cloud the boards talk to: the rig's local stand-in, or a real private deployment.

    For the local stack, the ports are where `rig up` listens (fixed, so boards can be told
    them); the in-process stack of a test session picks free ports instead.
    """

    kind: Literal["local", "remote"] = "local"
    api_url: str | None = None
    mqtt_host: str | None = None
    mqtt_port: Annotated[int, Field(ge=1, le=65535)] = 8883
    api_port: Annotated[int, Field(ge=1, le=65535)] = 8443
    ota_port: Annotated[int, Field(ge=1, le=65535)] = 8444
    ca_cert: Path | None = None

    @model_validator(mode="after")
    def _remote_needs_endpoints(self) -> StackConfig:
        if self.kind == "remote":
            missing = [k for k in ("api_url", "mqtt_host") if getattr(self, k) is None]
            if missing:
                raise ValueError(
                    f"a remote stack needs {' and '.join(missing)}. "
                    "Fix: give the deployment's REST base URL (api_url) and MQTT endpoint (mqtt_host)"
                )
        elif self.api_url or self.mqtt_host:
            raise ValueError("api_url/mqtt_host only apply to kind: remote. Fix: remove them or set kind: remote")
        return self


class HsmSecrets(_Strict):
    """PINs of the lab's SoftHSM2 token (Secure Boot V2 signing keys). ``env:VAR`` or literal."""

    pin: SecretStr
    so_pin: SecretStr

    @model_validator(mode="before")
    @classmethod
    def _resolve(cls, data: Any) -> Any:
        if isinstance(data, Mapping):
            data = {k: resolve_secret(v, f"HSM {k}") if isinstance(v, str) else v for k, v in data.items()}
        return data


class CaptureConfig(_Strict):
    interface: str = "lo"


class ProductConfig(_Strict):
    """The supplier's declaration (ETSI TS 103 701 ICS and IXIT)."""

    ics: Path = Path("product/ics.yaml")
    ixit: Path = Path("product/ixit.yaml")


class EfuseConfig(_Strict):
    sacrificial: bool = False


class BoardSpec(_Strict):
    """One board of the farm as ``boards.yaml`` declares it."""

    name: str
    kind: Literal["virtual", "esp"]
    chip: str = "esp32c3"
    port: str | None = None
    mac: str | None = None
    usb_serial: str | None = None
    firmware: Path | None = None
    tags: tuple[str, ...] = ()
    efuse: EfuseConfig | None = None
    address: str | None = None
    """IPv4 address where the host reaches the board's network side: for a real board e.g.
    its SoftAP's 192.168.4.1; for a virtual board the ``127.0.1.N`` it owns (default:
    derived from the name, see :attr:`network_address`)."""

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not _NAME_RE.fullmatch(v):
            raise ValueError(
                f"board name '{v}' cannot be used in test ids and file names. "
                "Fix: use 1-32 lower-case letters, digits, '-' or '_', starting with a letter or digit"
            )
        return v

    @field_validator("chip")
    @classmethod
    def _chip(cls, v: str) -> str:
        if v not in SUPPORTED_CHIPS:
            raise ValueError(
                f"chip '{v}' is not supported yet. Fix: use chip: {', '.join(SUPPORTED_CHIPS)} "
                "(the only chip(s) the rig has targets for)"
            )
        return v

    @field_validator("mac")
    @classmethod
    def _mac(cls, v: str | None) -> str | None:
        if v is None:
            return v
        norm = v.strip().lower().replace("-", ":")
        if not _MAC_RE.fullmatch(norm):
            raise ValueError(f"'{v}' is not a MAC address. Fix: write it as esptool read-mac prints it, aa:bb:cc:dd:ee:ff")
        return norm

    @field_validator("port")
    @classmethod
    def _port(cls, v: str | None) -> str | None:
        if v is None:
            return v
        if v.startswith("rfc2217://"):
            m = _RFC2217_RE.fullmatch(v)
            if not m or not 0 < int(m["port"]) < 65536:
                raise ValueError(f"'{v}' is not an RFC 2217 URL. Fix: write rfc2217://HOST:PORT")
            return v
        if v.startswith("/dev/"):
            return v
        raise ValueError(
            f"'{v}' is not a serial port the rig can open. "
            "Fix: use a device path (/dev/serial/by-id/... is stable across replugs) or rfc2217://HOST:PORT"
        )

    @field_validator("address")
    @classmethod
    def _address(cls, v: str | None, info: ValidationInfo) -> str | None:
        if v is None:
            return v
        try:
            address = str(ipaddress.IPv4Address(v.strip()))
        except ValueError:
            raise ValueError(
                f"'{v}' is not an IPv4 address. Fix: write it dotted, e.g. 192.168.4.1 (or 127.0.1.N for a virtual board)"
            ) from None
        if info.data.get("kind") == "virtual":
            check_virtual_address(address)
        return address

    @model_validator(mode="after")
    def _kind_rules(self) -> BoardSpec:
        if self.kind == "esp" and self.port is None:
            raise ValueError(
                f"board '{self.name}' is a real board (kind: esp) without a port. "
                "Fix: add port: /dev/serial/by-id/... or port: rfc2217://HOST:PORT"
            )
        if self.kind == "virtual" and self.port is not None:
            raise ValueError(
                f"board '{self.name}' is virtual; virtual boards get their port when started. "
                "Fix: remove port, or set kind: esp for a real board"
            )
        return self

    @property
    def network_address(self) -> str | None:
        """Where the host reaches the board: the declared address, or for a virtual board
        the one derived from its name (the same rule ``rig.vboard.serve`` applies)."""
        if self.address is not None or self.kind != "virtual":
            return self.address
        return default_board_address(self.name)

    @property
    def sacrificial(self) -> bool:
        """Whether eFuses may be burnt. Virtual eFuses live in a file, so virtual boards default to yes."""
        if self.efuse is not None:
            return self.efuse.sacrificial
        return self.kind == "virtual"


class Lab(_Strict):
    """The whole of ``boards.yaml``, validated. Paths are resolved against the file's folder."""

    lab: Annotated[str, Field(min_length=1)]
    stack: StackConfig = StackConfig()
    hsm: HsmSecrets | None = None
    wifi: tuple[WifiNetwork, ...] = ()
    capture: CaptureConfig = CaptureConfig()
    product: ProductConfig = ProductConfig()
    reports: Path = Path("reports")
    boards: tuple[BoardSpec, ...]
    source: Path | None = Field(default=None, exclude=True)

    @model_validator(mode="after")
    def _farm_rules(self) -> Lab:
        if not self.boards:
            raise _LocatedError("the farm has no boards. Fix: list at least one board under boards:", ("boards",))
        seen: dict[str, int] = {}
        for i, b in enumerate(self.boards):
            if b.name in seen:
                raise _LocatedError(
                    f"boards[{seen[b.name]}] and boards[{i}] are both named '{b.name}'. Fix: give every board its own name",
                    ("boards", i, "name"),
                )
            seen[b.name] = i
        ports: dict[str, str] = {}
        for i, b in enumerate(self.boards):
            if b.port is None:
                continue
            if b.port in ports:
                raise _LocatedError(
                    f"boards '{ports[b.port]}' and '{b.name}' share port {b.port}; one port is one board. "
                    "Fix: give each board its own port",
                    ("boards", i, "port"),
                )
            ports[b.port] = b.name
        addresses: dict[str, int] = {}
        for i, b in enumerate(self.boards):
            if b.kind != "virtual":
                continue
            address = b.network_address
            assert address is not None
            if address in addresses:
                first = self.boards[addresses[address]]
                how = "" if b.address and first.address else " (derived from the name where not given)"
                raise _LocatedError(
                    f"virtual boards '{first.name}' and '{b.name}' would share address {address}{how}; "
                    "each virtual board owns one loopback address. Fix: give one of them address: 127.0.1.N with a free N",
                    ("boards", i, "address") if b.address else ("boards", i, "name"),
                )
            addresses[address] = i
        ssids = [w.ssid for w in self.wifi]
        dup = {s for s in ssids if ssids.count(s) > 1}
        if dup:
            i = len(ssids) - 1 - ssids[::-1].index(sorted(dup)[0])
            raise _LocatedError(
                f"Wi-Fi ssid {sorted(dup)[0]!r} is listed twice. Fix: list each access point once", ("wifi", i, "ssid")
            )
        if any(b.kind == "esp" for b in self.boards):
            literal = [i for i, w in enumerate(self.wifi) if w.passphrase.get_secret_value() and not w.from_env]
            if literal:
                raise _LocatedError(
                    f"the passphrase of Wi-Fi '{self.wifi[literal[0]].ssid}' is written in the file, but this lab has "
                    "real boards. Fix: write passphrase: env:VAR and export VAR (literals are only for all-virtual labs)",
                    ("wifi", literal[0], "passphrase"),
                )
        return self

    # ---------------------------------------------------------------- queries

    @property
    def root(self) -> Path:
        """The folder relative paths in the file are resolved against."""
        return self.source.parent if self.source else Path.cwd()

    def path(self, p: Path) -> Path:
        return p if p.is_absolute() else (self.root / p)

    @property
    def state_dir(self) -> Path:
        """Where the rig keeps per-lab state (virtual boards' flash and eFuses, PKI, HSM tokens)."""
        return self.root / ".rig"

    @property
    def reports_dir(self) -> Path:
        return self.path(self.reports)

    def board(self, name: str) -> BoardSpec:
        for b in self.boards:
            if b.name == name:
                return b
        raise LabConfigError(
            self.source or DEFAULT_BOARDS_FILE,
            [f"{self._where()}: no board named '{name}'. Fix: use one of {', '.join(self.board_names)}"],
        )

    @property
    def board_names(self) -> list[str]:
        return [b.name for b in self.boards]

    def select(self, names: Sequence[str] | None) -> list[BoardSpec]:
        """The boards named (in file order), or every board when *names* is empty."""
        if not names:
            return list(self.boards)
        for n in names:
            self.board(n)
        return [b for b in self.boards if b.name in set(names)]

    def firmware_dir(self, board: BoardSpec) -> Path | None:
        """The board's firmware-set folder; virtual boards default to the rig-generated set."""
        if board.firmware is not None:
            return self.path(board.firmware)
        if board.kind == "virtual":
            return self.state_dir / "firmware" / "virtual"
        return None

    def live_port(self, board: BoardSpec) -> str | None:
        """Where the board answers now: a real board's declared port, a running virtual board's
        published ``rfc2217://`` URL (``None`` while it is not running)."""
        return board.port if board.kind == "esp" else published_port(self.state_dir, board.name)

    def live_address(self, board: BoardSpec) -> str | None:
        """Where the host reaches the board on the network now: the declared address, else (a
        virtual board) the address the running board published — the derived one, unless another
        lab's board held it (:mod:`rig.boards.address_lease`) — or, while it is not running, the
        derived one."""
        if board.kind == "virtual" and board.address is None:
            return published_address(self.state_dir, board.name) or board.network_address
        return board.network_address

    def radio_networks(self) -> list[RadioNetwork]:
        """The ``wifi:`` list as the virtual boards' air (``rig.boards.virtual_ports.write_radio_file``)."""
        return [radio_network(w.ssid, w.passphrase.get_secret_value(), w.auth, w.channel) for w in self.wifi]

    def redacted(self) -> dict[str, Any]:
        """The configuration as evidence may record it: every secret replaced by ``***``."""
        data = self.model_dump(mode="json", exclude={"source"})
        for w in data.get("wifi", []):
            if w.get("passphrase"):
                w["passphrase"] = REDACTED
        if data.get("hsm"):
            data["hsm"] = {k: REDACTED for k in data["hsm"]}
        return data

    def _where(self) -> str:
        return str(self.source) if self.source else DEFAULT_BOARDS_FILE


# --------------------------------------------------------------------------- loading


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key repeated in one mapping (PyYAML keeps the last silently)."""


def _construct_unique_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
    seen: dict[Any, yaml.Node] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                "while reading a mapping",
                node.start_mark,
                f"key '{key}' appears twice (first on line {seen[key].start_mark.line + 1})",
                key_node.start_mark,
            )
        seen[key] = key_node
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_unique_mapping)


def _node_at(root: yaml.Node | None, loc: Sequence[int | str]) -> yaml.Node | None:
    """The YAML node at a pydantic error location, or the deepest one that exists."""
    node = root
    for part in loc:
        if isinstance(node, yaml.MappingNode) and isinstance(part, str):
            nxt = next((v for k, v in node.value if getattr(k, "value", None) == part), None)
            if nxt is None:
                # an unknown key: point at the key itself
                key = next((k for k, _ in node.value if getattr(k, "value", None) == part), None)
                return key or node
            node = nxt
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            node = node.value[part]
        else:
            return node
    return node


def _unwrap(annotation: Any) -> Any:
    """Strip Optional/Annotated/tuple[...] to the model class a location refers to."""
    origin = typing.get_origin(annotation)
    if origin is Annotated:
        return _unwrap(typing.get_args(annotation)[0])
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(annotation):
            if arg is not type(None):
                return _unwrap(arg)
    return annotation


def _model_at(loc: Sequence[int | str]) -> type[BaseModel] | None:
    model: Any = Lab
    for part in loc:
        if isinstance(part, int):
            continue
        if not (isinstance(model, type) and issubclass(model, BaseModel)) or part not in model.model_fields:
            return None
        ann = _unwrap(model.model_fields[part].annotation)
        if typing.get_origin(ann) in (tuple, list):
            ann = _unwrap(typing.get_args(ann)[0])
        model = ann
    return model if isinstance(model, type) and issubclass(model, BaseModel) else None


def _key_path(loc: Sequence[int | str], data: Any) -> str:
    out = ""
    node = data
    for part in loc:
        if isinstance(part, int):
            name = node[part].get("name") if isinstance(node, list) and part < len(node) and isinstance(node[part], dict) else None
            out += f"[{part}]" + (f" ({name})" if name else "")
        else:
            out += ("." if out else "") + part
        try:
            node = node[part]
        except (KeyError, IndexError, TypeError):
            node = None
    return out or "(top level)"


def _explain(err: Mapping[str, Any]) -> str:
    """A pydantic error as a sentence with a fix."""
    kind = err["type"]
    loc = err["loc"]
    if kind == "extra_forbidden":
        model = _model_at(loc[:-1])
        allowed = ", ".join(n for n, f in model.model_fields.items() if not f.exclude) if model else ""
        return f"unknown key '{loc[-1]}'. Fix: remove it or correct its spelling" + (
            f" (allowed here: {allowed})" if allowed else ""
        )
    if kind == "missing":
        return f"required key '{loc[-1]}' is missing. Fix: add it"
    if kind == "literal_error":
        expected = err.get("ctx", {}).get("expected", "")
        return f"{err['input']!r} is not allowed. Fix: use one of {expected}"
    if kind == "value_error":
        return str(err["ctx"]["error"])
    return f"{err['msg']} (got {err.get('input')!r})"


def _yaml_problem(path: Path, exc: yaml.YAMLError) -> str:
    mark = getattr(exc, "problem_mark", None)
    where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
    problem = getattr(exc, "problem", None) or str(exc)
    if "appears twice" in problem:
        return f"{where}: {problem}. Fix: keep one of them"
    return f"{where}: YAML syntax error: {problem}. Fix: check indentation, colons and quoting on that line"


def load_lab(path: Path | str = DEFAULT_BOARDS_FILE) -> Lab:
    """Read and validate ``boards.yaml``; every problem becomes a :class:`LabConfigError`."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise LabConfigError(
            path, [f"{path}: file not found. Fix: pass --boards FILE, or copy the repo's boards.yaml and edit it"]
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise LabConfigError(path, [f"{path}: cannot be read ({exc}). Fix: check the path and that it is UTF-8 text"]) from None
    try:
        root = yaml.compose(text, Loader=_UniqueKeyLoader)
        data = yaml.load(text, Loader=_UniqueKeyLoader)
    except yaml.YAMLError as exc:
        raise LabConfigError(path, [_yaml_problem(path, exc)]) from None
    if data is None:
        raise LabConfigError(path, [f"{path}: the file is empty. Fix: describe the lab and its boards (see README)"])
    if not isinstance(data, dict):
        raise LabConfigError(
            path, [f"{path}:1: the top level must be a mapping with lab:, boards: … Fix: see the repo's boards.yaml"]
        )
    try:
        return Lab.model_validate({**data, "source": path.resolve()})
    except ValidationError as exc:
        problems = []
        for err in exc.errors(include_url=False):
            loc = tuple(err["loc"])
            located = err.get("ctx", {}).get("error")
            if isinstance(located, _LocatedError):
                loc = located.loc
            node = _node_at(root, loc)
            line = f":{node.start_mark.line + 1}" if node is not None else ""
            problems.append(f"{path}{line}: {_key_path(loc, data)}: {_explain(err)}")
        raise LabConfigError(path, problems) from None
