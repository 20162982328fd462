"""PII policy: mask personal data in log text before anything touches disk.

Used by the gateway's log writer and by training's scrubbing step (same module, same behaviour).

`PiiPolicy(mode="mask")` replaces:
- e-mail addresses               -> `[EMAIL]`  (also with non-ASCII letters: `josé@correo.es`, `用户@例子.中国`)
- credit-card numbers            -> `[CARD]`   (13-19 digits, grouped by spaces, dashes or dots, known issuer
                                                prefix, Luhn-valid only)
- US social security numbers     -> `[SSN]`    (`123-45-6789`; never-issued areas 000/666/9xx excluded)
- phone numbers                  -> `[PHONE]`  (`+<country> ...` with 8-15 digits, or North-American
                                                `(555) 123-4567` / `555-123-4567` / `555.123.4567`)
- IPv4 / IPv6 addresses          -> `[IP]`     (validated with `ipaddress`; loopback/unspecified kept)
- operator regexes               -> `[REDACTED]`

Deliberately NOT masked (false-positive traps, see tests): version numbers (`v1.2.3.4`,
`version 10.0.19041.1`), dates (`2024-01-15`, `12/03/2023`), times (`12:30:45`), hex literals, UUIDs,
numeric array literals, `host:port`, ISBNs, order/tracking numbers that fail Luhn or have no issuer prefix,
plain 10-digit numbers without phone punctuation, `127.0.0.1`, `0.0.0.0`, `::1`.
Masking is best-effort pattern matching, not a guarantee. Not detected: names, street addresses, dates of
birth, SSNs written without dashes, other countries' national ids, IBANs and bank accounts, passport and
licence numbers, card numbers split across lines, PII inside images or encoded text. Add operator patterns
(`pii_patterns`) for identifiers of your own domain.
"""
from __future__ import annotations

import dataclasses
import ipaddress
import re
from typing import Any, Iterable

from core.errors import InvalidArgument

MODES = ("off", "mask")

# unicode-aware: `\w` is any letter or digit, `[^\W_]` the same without `_`, `[^\W\d_]` letters only
_EMAIL = re.compile(r"(?<![\w.+%-])[^\W_][\w.%+-]*@[^\W_](?:[\w-]*[^\W_])?"
                    r"(?:\.[^\W_](?:[\w-]*[^\W_])?)*\.[^\W\d_]{2,24}\b")
# 13-19 digits, optionally grouped by single spaces or dashes
_CARD = re.compile(r"(?<![\w.\-/])\d(?:[ -]?\d){12,18}(?![\w/]|[.\-]\d)")
# dot-grouped, as printed on some receipts: 4111.1111.1111.1111, 3782.822463.10005 (groups only: no dotted runs)
_CARD_DOTTED = re.compile(r"(?<![\w.\-/])\d{4}\.\d{4,6}\.\d{4,5}(?:\.\d{1,4})?(?![\w/]|[.\-]\d)")
# US SSN, dashed; areas 000, 666 and 900-999 and group 00 / serial 0000 are never issued
_SSN = re.compile(r"(?<![\w\-/.])(?!000|666|9\d\d)\d{3}-(?!00)\d{2}-(?!0000)\d{4}(?![\w]|[\-/.]\d)")
# IPv4: four dotted octets 0..255, not part of a longer dotted run (1.2.3.4.5) or a word (v1.2.3.4)
_OCTET = r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
_IPV4 = re.compile(rf"(?<![\w.\-]){_OCTET}(?:\.{_OCTET}){{3}}(?![\w\-]|\.\d)")
_VERSION_BEFORE = re.compile(r"(?:\bv|\bversions?|\bver\.?|\brelease|\brel\.?|\bbuild|\btag|\bfirmware|"
                             r"\bkernel|\bos|\bsdk|\bpython|\bnode|\bbump(?:ed)?\s+to|==|>=|<=|~=|@)\s*[:=]?\s*$",
                             re.IGNORECASE)
# IPv6 candidates (validated by ipaddress afterwards), optional %zone
_IPV6 = re.compile(r"(?<![\w:.])(?:[0-9A-Fa-f]{0,4}:){2,7}(?:[0-9A-Fa-f]{1,4}|(?:\d{1,3}\.){3}\d{1,3})?"
                   r"(?:%[\w.-]+)?(?![\w:])")
_PHONE_INTL = re.compile(r"(?<![\w+])\+\d{1,3}(?:[ .-]?\(?\d{1,4}\)?){2,5}(?!\w|[.\-]\d)")
_PHONE_NANP = re.compile(r"(?<![\w.\-/])(?:\(\d{3}\)[ ]?|\d{3}([-. ]))\d{3}(?(1)\1|[-. ])\d{4}(?![\w]|[.\-/]\d)")

_CARD_PREFIX = re.compile(r"^(?:4|5[1-5]|2(?:2[2-9]|[3-6]\d|7[01]|720)|3[47]|3(?:0[0-5]|[68])|6(?:011|5|4[4-9])|35)")


def luhn_valid(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = ord(ch) - 48
        if i % 2 == 1:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return total % 10 == 0


def _email_sub(m: re.Match) -> str:
    # `git@github.com:org/repo` is an SSH remote, not a person
    return m.group(0) if m.group(0).lower().startswith("git@") else "[EMAIL]"


def _card_sub(m: re.Match) -> str:
    digits = re.sub(r"[ .-]", "", m.group(0))
    if 13 <= len(digits) <= 19 and _CARD_PREFIX.match(digits) and luhn_valid(digits) and len(set(digits)) > 1:
        return "[CARD]"
    return m.group(0)


def _ipv4_sub(m: re.Match) -> str:
    text = m.string
    before = text[max(0, m.start() - 24):m.start()]
    if _VERSION_BEFORE.search(before):
        return m.group(0)
    ip = ipaddress.IPv4Address(m.group(0))
    if ip.is_loopback or ip.is_unspecified:
        return m.group(0)
    return "[IP]"


def _ipv6_sub(m: re.Match) -> str:
    s = m.group(0)
    if s.count(":") < 2 or not any(ch.isdigit() for ch in s):
        return s  # C++ scopes like `ab::cd`, or nothing address-like
    try:
        ip = ipaddress.IPv6Address(s)
    except ValueError:
        return s  # times (12:30:45), MAC addresses, Python slices ...
    if ip.is_loopback or ip.is_unspecified:
        return s
    return "[IP]"


def _phone_intl_sub(m: re.Match) -> str:
    digits = re.sub(r"\D", "", m.group(0))
    return "[PHONE]" if 8 <= len(digits) <= 15 else m.group(0)


@dataclasses.dataclass
class PiiPolicy:
    """What to do with personal data in logged text. `mode`: `off` (store as sent) or `mask`.

    `extra_patterns`: operator regular expressions (Python `re` syntax), each match -> `[REDACTED]`;
    applied before the built-in detectors.
    """

    mode: str = "off"
    extra_patterns: list[str] = dataclasses.field(default_factory=list)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise InvalidArgument(f"PII mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        self._extra = []
        for p in self.extra_patterns or []:
            try:
                self._extra.append(re.compile(p))
            except re.error as exc:
                raise InvalidArgument(f"invalid PII pattern {p!r}: {exc}") from None

    @classmethod
    def from_config(cls, logs_cfg: Any) -> "PiiPolicy":
        """From `router.config.LogsConfig` (fields `pii`, `pii_patterns`)."""
        return cls(mode=logs_cfg.pii, extra_patterns=list(logs_cfg.pii_patterns or []))

    @property
    def enabled(self) -> bool:
        return self.mode == "mask"

    def apply(self, text: str) -> str:
        if not self.enabled or not text:
            return text
        for rx in self._extra:
            text = rx.sub("[REDACTED]", text)
        text = _EMAIL.sub(_email_sub, text)
        text = _CARD.sub(_card_sub, text)
        text = _CARD_DOTTED.sub(_card_sub, text)
        text = _SSN.sub("[SSN]", text)
        text = _IPV6.sub(_ipv6_sub, text)
        text = _IPV4.sub(_ipv4_sub, text)
        text = _PHONE_INTL.sub(_phone_intl_sub, text)
        text = _PHONE_NANP.sub("[PHONE]", text)
        return text

    def apply_messages(self, msgs: Iterable[dict]) -> list[dict]:
        """A masked copy of chat messages; `content` may be a string or a list of `{"type": "text", "text"}` parts."""
        out = []
        for m in msgs:
            m = dict(m)
            if not self.enabled:
                out.append(m)
                continue
            content = m.get("content")
            if isinstance(content, str):
                m["content"] = self.apply(content)
            elif isinstance(content, list):
                parts = []
                for part in content:
                    if isinstance(part, dict) and isinstance(part.get("text"), str):
                        part = {**part, "text": self.apply(part["text"])}
                    parts.append(part)
                m["content"] = parts
            out.append(m)
        return out

    def apply_record(self, record):
        """A masked copy of a `LogRecord` (messages, response, reasoning, error text)."""
        if not self.enabled:
            return record
        return dataclasses.replace(
            record,
            messages=self.apply_messages(record.messages),
            response_text=self.apply(record.response_text),
            reasoning_text=self.apply(record.reasoning_text),
            error=self.apply(record.error),
        )
