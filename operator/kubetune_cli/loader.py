"""Read FineTuneJob YAML the way kubectl reads it.

kubectl turns YAML into JSON with sigs.k8s.io/yaml, which parses with a fork
of go-yaml v2; the API server then sees JSON. PyYAML differs from that parser
on plain scalars (`1e3` is a number there and a string here, `y` a boolean
there, `2024-01-01` a string there and a date here), so this module swaps
PyYAML's implicit resolvers for go-yaml's, and refuses what kubectl refuses:
excessive aliasing (a small file that expands into gigabytes), NaN and
infinities (not JSON), keys that are not scalars, bytes that are not UTF-8.
The result is what `kubectl apply` would send; kubetune_api.validation then
normalizes numbers as the API server decodes them.

libyaml's C parser (PyYAML's CParser, driven event by event under the same
composer, resolvers and constructor) reads most files, several times faster than
PyYAML's pure-Python scanner. Whatever it cannot read exactly alike goes to the
pure parser, which stays the reference: every error (so messages and marks are
its own), text with a character where the two parsers may differ (_PURE_ONLY),
and nesting deeper than _FAST_MAX_DEPTH, where the pure reading's RecursionError
decides.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Optional

import yaml
from yaml.composer import Composer
from yaml.constructor import SafeConstructor
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from kubetune_api.validation import FieldError, short

_NUMBER_TAG = "tag:kubetune.io,2026:go-number"
_BOOL_TAG = "tag:yaml.org,2002:bool"

# go-yaml v2's plain-scalar booleans (YAML 1.1, with y/n).
_BOOLS = {
    **dict.fromkeys(
        ["y", "Y", "yes", "Yes", "YES", "true", "True", "TRUE", "on", "On", "ON"], True
    ),
    **dict.fromkeys(
        ["n", "N", "no", "No", "NO", "false", "False", "FALSE", "off", "Off", "OFF"], False
    ),
}
_SPECIAL_FLOATS = {
    **dict.fromkeys([".nan", ".NaN", ".NAN"], math.nan),
    **dict.fromkeys([".inf", ".Inf", ".INF", "+.inf", "+.Inf", "+.INF"], math.inf),
    **dict.fromkeys(["-.inf", "-.Inf", "-.INF"], -math.inf),
}
_YAML_STYLE_FLOAT = re.compile(r"[-+]?(\.[0-9]+|[0-9]+(\.[0-9]*)?)([eE][-+]?[0-9]+)?")
_INT64 = (-(2**63), 2**63 - 1)
_UINT64_MAX = 2**64 - 1


def _go_parse_int(text: str, signed: bool = True) -> Optional[int]:
    """strconv.ParseInt(text, 0, 64) (or ParseUint), None where Go fails."""
    body, sign = text, 1
    if body[:1] in ("+", "-"):
        if not signed:
            return None
        sign, body = (-1 if body[0] == "-" else 1), body[1:]
    base = 10
    prefix = body[:2].lower()
    if prefix in ("0x", "0o", "0b"):
        base, body = {"0x": 16, "0o": 8, "0b": 2}[prefix], body[2:]
    elif body[:1] == "0" and len(body) > 1:
        base, body = 8, body[1:]
    digits = "0123456789abcdef"[:base]
    if not body or any(c not in digits for c in body.lower()):
        return None
    value = sign * int(body, base)
    low, high = _INT64 if signed else (0, _UINT64_MAX)
    return value if low <= value <= high else None


def go_yaml_scalar(text: str) -> Any:
    """What go-yaml v2 makes of a plain scalar that starts like a number."""
    if text in _SPECIAL_FLOATS:
        return _SPECIAL_FLOATS[text]
    if text.startswith("."):
        if "_" not in text and _YAML_STYLE_FLOAT.fullmatch(text):
            value = float(text)
            return value if math.isfinite(value) else text
        return text
    plain = text.replace("_", "")
    for signed in (True, False):
        value = _go_parse_int(plain, signed)
        if value is not None:
            return value
    if _YAML_STYLE_FLOAT.fullmatch(plain):
        value = float(plain)
        if math.isfinite(value):  # Go's ParseFloat fails on overflow: a string then
            return value
    if plain.startswith(("0b", "-0b")):
        negative = plain.startswith("-")
        body = plain[3:] if negative else plain[2:]
        if body and set(body) <= {"0", "1"}:
            value = int(body, 2) * (-1 if negative else 1)
            if _INT64[0] <= value <= _INT64[1]:
                return value
    return text


class _Constructor(SafeConstructor):
    def construct_object(self, node: Node, deep: bool = False) -> Any:
        """PyYAML's, but a value its explicit tag cannot hold (`!!int ''`,
        `!!float x`, `!!binary` that is not base64) is a YAML error at the value,
        as kubectl refuses it, not a crash."""
        try:
            return super().construct_object(node, deep=deep)
        except yaml.YAMLError:
            raise
        except (ValueError, IndexError, TypeError, OverflowError, KeyError, AttributeError) as exc:
            tag = str(node.tag).rsplit(":", 1)[-1]
            value = node.value if isinstance(node, ScalarNode) else f"a {node.id}"
            raise yaml.constructor.ConstructorError(
                None,
                None,
                f"{short(value, 60)} is not a valid !!{tag} (the value's explicit tag): "
                "remove the tag or fix the value",
                node.start_mark,
            ) from exc

    def construct_go_number(self, node: ScalarNode) -> Any:
        return go_yaml_scalar(self.construct_scalar(node))

    def construct_go_bool(self, node: ScalarNode) -> Any:
        text = self.construct_scalar(node)
        return _BOOLS.get(text, text)


_Constructor.add_constructor(_NUMBER_TAG, _Constructor.construct_go_number)
_Constructor.add_constructor(_BOOL_TAG, _Constructor.construct_go_bool)


class _GoResolver(yaml.resolver.Resolver):
    pass


# go-yaml v2 resolves plain scalars by their first character; replace PyYAML's
# YAML 1.1 int/float (sexagesimal, no exponent without a dot), timestamp and
# `=` resolvers with that.
_DROPPED = {
    "tag:yaml.org,2002:int",
    "tag:yaml.org,2002:float",
    "tag:yaml.org,2002:timestamp",
    "tag:yaml.org,2002:value",
    _BOOL_TAG,
}
_GoResolver.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag not in _DROPPED]
    for first, resolvers in yaml.resolver.Resolver.yaml_implicit_resolvers.items()
}
_GoResolver.add_implicit_resolver(
    _BOOL_TAG, re.compile("^(?:" + "|".join(_BOOLS) + ")$"), list("yYnNtTfFoO")
)
_GoResolver.add_implicit_resolver(
    _NUMBER_TAG, re.compile(r"^[-+.0-9].*$", re.S), list("-+.0123456789")
)


class KubectlLoader(
    yaml.reader.Reader,
    yaml.scanner.Scanner,
    yaml.parser.Parser,
    Composer,
    _Constructor,
    _GoResolver,
):
    """PyYAML's pure-Python reader, scanner and parser: the reference reading."""

    def __init__(self, stream: str):
        yaml.reader.Reader.__init__(self, stream)
        yaml.scanner.Scanner.__init__(self)
        yaml.parser.Parser.__init__(self)
        Composer.__init__(self)
        _Constructor.__init__(self)
        _GoResolver.__init__(self)


# Nesting deeper than this is read by the pure parser (a FineTuneJob is a few
# levels deep; Python's recursion limit stops the composer at a few hundred).
_FAST_MAX_DEPTH = 64


class _TooDeep(Exception):
    pass


_CParser = getattr(getattr(yaml, "_yaml", None), "CParser", None)
if _CParser is not None:

    class _FastLoader(Composer, _Constructor, _GoResolver, _CParser):
        """The same composer, constructor and resolvers over libyaml's events (the
        C scanner and parser, several times faster). CParser comes last so that
        Composer's check_node/get_node win over its own C composition."""

        def __init__(self, stream: str):
            _CParser.__init__(self, stream)
            Composer.__init__(self)
            _Constructor.__init__(self)
            _GoResolver.__init__(self)
            self.depth = 0

        # Deep nesting is left to the pure reading, whose RecursionError decides
        # it (its stack depth per level differs from this one's).
        def _nested(self, compose: Any, anchor: Optional[str]) -> Node:
            self.depth += 1
            if self.depth > _FAST_MAX_DEPTH:
                raise _TooDeep()
            node = compose(self, anchor)
            self.depth -= 1
            return node

        def compose_sequence_node(self, anchor: Optional[str]) -> Node:
            return self._nested(Composer.compose_sequence_node, anchor)

        def compose_mapping_node(self, anchor: Optional[str]) -> Node:
            return self._nested(Composer.compose_mapping_node, anchor)

else:  # PyYAML built without libyaml
    _FastLoader = None


# ---------------------------------------------------------------------------- aliasing

# go-yaml v2 refuses a document whose decoding is mostly alias expansion
# ("document contains excessive aliasing"); the same counts and thresholds.
_ALIAS_RATIO_LOW, _ALIAS_RATIO_HIGH = 400_000, 4_000_000


def _allowed_alias_ratio(decoded: int) -> float:
    if decoded <= _ALIAS_RATIO_LOW:
        return 0.99
    if decoded >= _ALIAS_RATIO_HIGH:
        return 0.10
    span = _ALIAS_RATIO_HIGH - _ALIAS_RATIO_LOW
    return 0.99 - 0.89 * (decoded - _ALIAS_RATIO_LOW) / span


class ExcessiveAliasing(Exception):
    pass


def check_aliasing(root: Node) -> None:
    """Walk the node graph in document order as go-yaml decodes it: a node met
    a second time is an alias, and decoding it again counts as alias expansion."""
    decoded = aliased = 0
    seen: set[int] = set()
    stack: list[tuple[Node, bool]] = [(root, False)]
    while stack:
        node, in_alias = stack.pop()
        decoded += 1
        if in_alias:
            aliased += 1
        if aliased > 100 and decoded > 1000 and aliased / decoded > _allowed_alias_ratio(decoded):
            raise ExcessiveAliasing()
        if id(node) in seen and not in_alias:
            in_alias = True  # the alias node itself counted once, outside the expansion
            decoded += 1
            aliased += 1
        seen.add(id(node))
        children: list[Node] = []
        if isinstance(node, SequenceNode):
            children = list(node.value)
        elif isinstance(node, MappingNode):
            for key, value in node.value:
                children += [key, value]
        stack.extend((c, in_alias) for c in reversed(children))


# ---------------------------------------------------------------------------- documents


@dataclass
class Loaded:
    documents: list[Any]
    error: Optional[FieldError] = None
    warnings: list[str] = field(default_factory=list)


# Text that only the pure reader decides, where libyaml reads differently or
# might: the characters it refuses (libyaml's list differs), tabs (libyaml takes
# them as separators in more places), `?` (libyaml does not end a plain scalar at
# it inside [] and {}), `!` (libyaml reads an empty node tagged `!` as "", PyYAML
# as null), `|` and `>` (block scalars: libyaml takes a comment right after the
# header) and a byte-order mark after the start (libyaml skips one at any line's
# start). Files made of JSON, mappings, lists, quoted and plain scalars, anchors
# and comments go the fast way.
_PURE_ONLY = re.compile(yaml.reader.Reader.NON_PRINTABLE.pattern + r"|[\t?!|>\ufeff]")


def _line_col(text: str, index: int) -> str:
    line = text.count("\n", 0, index) + 1
    column = index - (text.rfind("\n", 0, index) + 1) + 1
    return f"line {line}, column {column}"


def decode(data: bytes) -> tuple[str, list[str]]:
    """Bytes → text as kubectl reads them: UTF-8, or UTF-16 with a byte-order mark.
    Bytes that are not UTF-8 reach the API server as U+FFFD; say so, and where."""
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        try:
            return data.decode("utf-16"), []
        except UnicodeDecodeError:
            pass
    try:
        return data.decode("utf-8-sig"), []
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        column = exc.start - (data.rfind(b"\n", 0, exc.start) + 1) + 1
        warning = (
            f"line {line}, column {column}: byte 0x{data[exc.start]:02x} is not UTF-8 text; "
            "kubectl sends such bytes as \ufffd: save the file as UTF-8"
        )
        return data.decode("utf-8-sig", errors="replace"), [warning]


def _compose_all(loader: Any, docs: list[Any], aliases: bool = True) -> list[Any]:
    """Append each non-empty document to docs (which holds those read before an
    error); `aliases` False skips the alias count where the text has none."""
    while loader.check_node():
        node = loader.get_node()
        if node is None:
            continue
        if aliases:  # without an alias no node is met twice: nothing to count
            check_aliasing(node)
        doc = loader.construct_document(node)
        if doc is not None:
            docs.append(doc)
    return docs


def _load_fast(text: str) -> Optional[list[Any]]:
    """The documents read through libyaml, or None where the pure reading must
    decide: any error (its messages and marks are the pure parser's), and input
    where libyaml could read differently."""
    if _FastLoader is None or _PURE_ONLY.search(text):
        return None
    loader = None
    try:
        loader = _FastLoader(text)
        return _compose_all(loader, [], "*" in text)
    except Exception:  # noqa: BLE001 - the pure reading gives the verdict
        return None
    finally:
        if loader is not None:
            loader.dispose()


def load_documents(data: bytes) -> Loaded:
    """Every non-empty document of a YAML stream, as kubectl would send it."""
    text, warnings = decode(data)
    fast = _load_fast(text)
    if fast is not None:
        return Loaded(fast, warnings=warnings)
    return _load_pure(text, warnings)


def _load_pure(text: str, warnings: list[str]) -> Loaded:
    """PyYAML's own reading: the reference, and the one that words every error."""
    docs: list[Any] = []
    loader = None
    try:
        loader = KubectlLoader(text)
        _compose_all(loader, docs)
    except ExcessiveAliasing:
        return Loaded(
            docs,
            FieldError(
                f"(yaml document {len(docs) + 1})",
                "document contains excessive aliasing (anchors expanding into a huge document)",
                "write the values out instead of nesting aliases",
            ),
        )
    except yaml.reader.ReaderError as exc:
        char = exc.character if isinstance(exc.character, str) else chr(exc.character)
        return Loaded(
            docs,
            FieldError(
                f"(yaml {_line_col(text, exc.position)})",
                f"character {char!r} (U+{ord(char):04X}) is not allowed in YAML text",
                "remove it, or write it as an escape inside a double-quoted string",
            ),
        )
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "stream"
        problem = exc.problem or exc.context or "not valid YAML"
        return Loaded(
            docs, FieldError(f"(yaml {where})", short(problem, 200), "fix the YAML syntax")
        )
    except RecursionError:
        return Loaded(
            docs,
            FieldError(
                f"(yaml document {len(docs) + 1})",
                "is nested too deeply to be a FineTuneJob",
                "flatten it; a FineTuneJob is a few levels deep",
            ),
        )
    except (yaml.YAMLError, ValueError, OverflowError) as exc:
        return Loaded(
            docs,
            FieldError(f"(yaml document {len(docs) + 1})", short(str(exc), 200), "fix the YAML"),
        )
    finally:
        if loader is not None:
            loader.dispose()
    return Loaded(docs, warnings=warnings)
