"""The rules of the sensitive-data scan, where each comes from, and the kind each finds.

Three sources, each recorded by name and version in the export receipts (`RULESET`):

- **detect-secrets** (Yelp, PyPI `detect-secrets`): the regular expressions of its plugins,
  read from the installed package by `python -m refinery.sensitive.rules --write` into
  `detect_secrets_rules.json` (loaded as data, so a run does not import the package); a test
  fails when that file no longer matches the installed version, or when a plugin appears that
  this module does not map to a kind.
- **python-stdnum**: check-digit validators (Luhn for card numbers, IBAN per-country length
  and mod-97, US SSN number ranges), so a number is reported only when it is well-formed.
- **refinery**: what the first two do not cover, written here: key shapes of providers
  detect-secrets has no plugin for (Hugging Face, Anthropic and current OpenAI keys, Google,
  npm, DigitalOcean, Databricks), high-entropy tokens next to key-like words, passwords in
  prose, URLs with credentials on any host, `Bearer`/`Basic` headers, whole PEM blocks, emails,
  phone numbers (international and North-American forms), card numbers, IBANs, SSNs, and
  marked private notes.

Every rule has keywords: it runs only on a text whose lower-cased form contains one of them
(the way gitleaks pre-filters its rules), which keeps the scan cheap on ordinary prose.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import sys
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path

RULES_FILE = Path(__file__).with_name("detect_secrets_rules.json")

SECRET_KINDS = ("api_key", "bearer_token", "private_key", "password")
PII_KINDS = ("email", "phone", "credit_card", "iban", "ssn", "private_note")
KINDS = SECRET_KINDS + PII_KINDS


@dataclass(frozen=True)
class Rule:
    id: str
    kind: str
    regex: re.Pattern[str]
    keywords: tuple[str, ...]  # lower-case; the rule runs only when one occurs in the lower-cased text
    valid: Callable[[str], bool] | None = None  # checks the secret (group 1 if the regex has one)
    gate: re.Pattern[str] | None = None  # where keywords cannot say it: the rule runs only when this is found
    near: re.Pattern[str] | None = None  # a match counts only when this matches up to its start (64 chars back)
    numeric: bool = False  # looked for only inside runs of digits and separators (NUMBER_RUN)


#: Where a phone, card or SSN number can be: 8+ characters of digits, spaces, dots, dashes,
#: slashes and brackets. Numeric rules run inside these runs only, not over the whole text.
NUMBER_RUN = re.compile(r"[+(]?\d[\d .()/-]{6,}\d")
_NUMERIC = {"phone-international", "phone-north-american", "card-number", "us-ssn"}


# --- detect-secrets -----------------------------------------------------------------------

#: detect-secrets plugin → (kind, keywords). Plugins without regular expressions (the entropy
#: and keyword detectors) serve the independent second pass (refinery.sensitive.check).
DETECT_SECRETS: dict[str, tuple[str, tuple[str, ...]]] = {
    "AWSKeyDetector": ("api_key", ("a3t", "abia", "acca", "akia", "asia", "aws")),
    "ArtifactoryDetector": ("api_key", ()),  # gated below: its prefixes are case-sensitive
    "AzureStorageKeyDetector": ("api_key", ("accountkey=",)),
    "BasicAuthDetector": ("password", ("://",)),
    "CloudantDetector": ("api_key", ("cloudant", "cl_", "cl-", "clkey", "clpw", "clpass", "clapi", "cltoken",
                                     "clou")),
    "DiscordBotTokenDetector": ("api_key", (".",)),
    "GitHubTokenDetector": ("api_key", ("ghp_", "gho_", "ghu_", "ghs_", "ghr_")),
    "GitLabTokenDetector": ("api_key", ("glpat-", "gldt-", "glft-", "glsoat-", "glrt-", "gr1348941", "glcbt-",
                                        "glimt-", "glptt-", "glagent-", "gloas-")),
    "IbmCloudIamDetector": ("api_key", ("iam",)),
    "IbmCosHmacDetector": ("api_key", ("cos",)),
    "JwtTokenDetector": ("bearer_token", ("eyj",)),
    "MailchimpDetector": ("api_key", ("-us",)),
    "NpmDetector": ("api_key", ("_authtoken",)),
    "OpenAIDetector": ("api_key", ("t3blbkfj",)),
    "PrivateKeyDetector": ("private_key", ("begin", "putty-user-key-file")),
    "PypiTokenDetector": ("api_key", ("pypi-",)),
    "SendGridDetector": ("api_key", ("sg.",)),
    "SlackDetector": ("api_key", ("xox", "hooks.slack.com")),
    "SoftlayerDetector": ("api_key", ("softlayer", "sl_", "sl-", "slapi", "slkey", "slpass", "slpw")),
    "SquareOAuthDetector": ("api_key", ("sq0csp-",)),
    "StripeDetector": ("api_key", ("k_live_",)),
    "TelegramBotTokenDetector": ("api_key", ()),  # gated below: <bot id>:<35 characters>
    "TwilioKeyDetector": ("api_key", ("ac", "sk")),
}
#: Cheap searches that decide whether a detect-secrets pattern is worth running at all, for the
#: plugins whose patterns start with no literal a keyword could stand for.
DETECT_SECRETS_GATES: dict[str, str] = {
    "ArtifactoryDetector": r"AKC|AP[\dA-F]",
    "TelegramBotTokenDetector": r"\d:[0-9A-Za-z_-]{35}",
}
#: Plugins left out, and why.
DETECT_SECRETS_SKIPPED = {
    "IPPublicDetector": "a public IP address is not a credential, and operations traces name hosts all the time",
}
_FLAGS = {"IGNORECASE": re.IGNORECASE, "MULTILINE": re.MULTILINE, "DOTALL": re.DOTALL, "VERBOSE": re.VERBOSE}


def read_detect_secrets() -> dict:
    """The regular expressions of the installed detect-secrets, as the data this module loads."""
    from importlib.metadata import version

    from detect_secrets.core.plugins.util import get_mapping_from_secret_type_to_class

    plugins = []
    for secret_type, cls in sorted(get_mapping_from_secret_type_to_class().items(), key=lambda kv: kv[1].__name__):
        patterns = [{"pattern": rx.pattern, "flags": sorted(k for k, f in _FLAGS.items() if rx.flags & f)}
                    for rx in getattr(cls, "denylist", ())]
        plugins.append({"plugin": cls.__name__, "secret_type": secret_type, "patterns": patterns})
    return {"source": "detect-secrets", "version": version("detect-secrets"),
            "url": "https://github.com/Yelp/detect-secrets", "license": "Apache-2.0",
            "written_by": "python -m refinery.sensitive.rules --write", "plugins": plugins}


@cache
def _detect_secrets_data() -> dict:
    return json.loads(RULES_FILE.read_text(encoding="utf-8"))


def _detect_secrets_rules() -> list[Rule]:
    rules = []
    for p in _detect_secrets_data()["plugins"]:
        name = p["plugin"]
        if name in DETECT_SECRETS_SKIPPED or not p["patterns"]:
            continue
        kind, keywords = DETECT_SECRETS[name]  # a KeyError here is caught by a test, not by users
        for i, pat in enumerate(p["patterns"]):
            flags = 0
            for f in pat["flags"]:
                flags |= _FLAGS[f]
            gate = DETECT_SECRETS_GATES.get(name)
            rules.append(Rule(f"detect-secrets:{name}#{i}", kind, re.compile(pat["pattern"], flags), keywords,
                              gate=re.compile(gate) if gate else None))
    return rules


# --- validators ---------------------------------------------------------------------------


def entropy(s: str) -> float:
    """Shannon entropy of `s` in bits per character."""
    n = len(s)
    return -sum(c / n * math.log2(c / n) for c in Counter(s).values()) if n else 0.0


_WORD = re.compile(r"[a-z]{3,}")


def random_looking(token: str) -> bool:
    """A token that reads like a generated key rather than a word, a name or a path."""
    if len(token) < 16 or entropy(token) < 3.3:
        return False
    # '/' (standard base64) beside '_', '-' or '.' (URL-safe base64, file names) is a path:
    # uploads/2024/05/report_q2.pdf, mistralai/Mistral-7B-Instruct-v0.3
    if "/" in token and any(c in token for c in "_-."):
        return False
    # two lower-case words among its parts make an identifier: user_profile_v2_8a7b6c5d4e
    if sum(1 for part in re.split(r"[_.-]", token) if _WORD.fullmatch(part)) >= 2:
        return False
    digits = sum(c.isdigit() for c in token)
    upper = sum(c.isupper() for c in token)
    lower = sum(c.islower() for c in token)
    if digits >= 2 and upper + lower >= 2:
        return True
    # long base64 keys (an AWS secret access key is 40) can have a single digit, or none
    return len(token) >= 30 and upper >= 2 and lower >= 2 and (digits >= 1 or "/" in token or "+" in token)


def _aws_secret(token: str) -> bool:
    return (random_looking(token) and any(c.isupper() for c in token) and any(c.islower() for c in token)
            and any(c.isdigit() or c in "/+" for c in token))


def _not_a_word_or_number(token: str) -> bool:
    """A key: letters and digits both (not a word, not a count)."""
    return any(c.isdigit() for c in token) and any(c.isalpha() for c in token)


def _not_a_word(token: str) -> bool:
    """A token, not a word: it has a digit, a symbol or mixed case ("Bearer of bad news" is prose)."""
    return any(not c.isalpha() for c in token) or token != token.lower()


def _generated(token: str) -> bool:
    """A digit or mixed case: a key, not hyphenated words (sk-learn-compatible-estimators)."""
    return any(c.isdigit() for c in token) or (any(c.isupper() for c in token) and any(c.islower() for c in token))


#: Values after "password:" that are no password: placeholders, booleans, what forms print.
_NOT_A_PASSWORD = frozenset("""
required missing empty blank none null nil undefined optional true false yes no on off hidden
redacted masked changed reset unset unknown n/a password passwd passphrase passcode pass pwd secret
""".split())
#: Words after "password is" that describe the password rather than give it.
_DESCRIBES_A_PASSWORD = _NOT_A_PASSWORD | frozenset("""
incorrect invalid wrong expired correct not too set change strong weak the a an your my his her
their our its this that same different new old stored hashed encrypted protected managed rotated
valid needed necessary mandatory case-sensitive sensitive secret ok fine below above here there
""".split())
# Code and templates, not a value: request.form['password'], ${DB_PASSWORD}, $DB_PASSWORD,
# {{ db_password }}, %(password)s, <your-password>, ********, os.environ.get(...), board.D4
_CODE_OR_PLACEHOLDER = re.compile(r"\$\{|\$[A-Z_][A-Z0-9_]*$|\{\{|%\(|<[^>]*>?$|\*+$|.*[(\[]"
                                  r"|[A-Za-z_]\w*\.[A-Za-z_]\w*$")


def _password(value: str) -> bool:
    v = value.strip(".,;:!?)]}")
    return (len(v) >= 3 and v.lower() not in _NOT_A_PASSWORD and not v.lower().startswith("[redacted")
            and _CODE_OR_PLACEHOLDER.match(v) is None)


def _prose_password(value: str) -> bool:
    """After "is"/"was" a password must look like one: a digit, a symbol or mixed case."""
    v = value.strip(".,;:!?)]}")
    if not _password(value) or v.lower() in _DESCRIBES_A_PASSWORD:
        return False
    return any(not c.isalpha() for c in v) or (v != v.lower() and v != v.upper() and v[1:] != v[1:].lower())


def _luhn_card(value: str) -> bool:
    from stdnum import luhn

    digits = re.sub(r"\D", "", value)
    if not 13 <= len(digits) <= 19 or not _IIN.match(digits):
        return False
    return luhn.is_valid(digits)


# Issuer prefixes of the card networks (Visa, Mastercard, Amex, Discover, JCB, Diners, UnionPay,
# Maestro): a Luhn-valid number outside them is more likely an order or tracking number.
_IIN = re.compile(r"4|5[1-5]|2(?:2[2-9]|[3-6]|7[01]|720)|3[47]|6011|64[4-9]|65|35(?:2[89]|[3-8])|30[0-5]|3[68]|62|"
                  r"5[06-9]|6")


def _iban(value: str) -> bool:
    from stdnum import iban

    # the IBAN's own structure (per-country length, mod 97), not the national account checks,
    # which also want the bank code in stdnum's registry: a new bank's IBAN is still an IBAN
    return iban.is_valid(value, check_country=False)


def _ssn(value: str) -> bool:
    from stdnum.us import ssn

    return ssn.is_valid(value)


def _phone(value: str) -> bool:
    digits = sum(c.isdigit() for c in value)
    if value.startswith("00"):
        digits -= 2
    return 8 <= digits <= 15


# --- refinery's own rules -----------------------------------------------------------------

_KEY_WORDS = (r"(?:api[_ .-]?key|apikey|secret(?:[_ .-]?access)?(?:[_ .-]?key)?|access[_ .-]?key(?:[_ .-]?id)?"
              r"|auth[_ .-]?token|access[_ .-]?token|refresh[_ .-]?token|token|client[_ .-]?secret|credentials?"
              r"|signing[_ .-]?key|private[_ .-]?key|key)")

_OWN: list[tuple[str, str, str, tuple[str, ...], Callable[[str], bool] | None]] = [
    # provider keys detect-secrets has no plugin for (or matches only in an older form)
    ("provider-sk-key", "api_key", r"[spr](?<![A-Za-z0-9][spr])k[-_]([A-Za-z0-9_-]{20,})", ("sk-", "sk_", "pk-",
                                                                                            "pk_", "rk-", "rk_"),
     _generated),
    ("huggingface-token", "api_key", r"(?<![A-Za-z0-9])hf_[A-Za-z0-9]{30,}", ("hf_",), None),
    ("google-api-key", "api_key", r"AIza[0-9A-Za-z_-]{35}", ("aiza",), None),
    ("github-token", "api_key", r"(?<![A-Za-z0-9])(?:gh[pousr]_[A-Za-z0-9]{30,}|github_pat_[A-Za-z0-9_]{30,})",
     ("gh", "github_pat_"), None),
    ("slack-token", "api_key", r"(?<![A-Za-z0-9])xox[abposre]-[A-Za-z0-9-]{10,}", ("xox",), None),
    ("npm-token", "api_key", r"(?<![A-Za-z0-9])npm_[A-Za-z0-9]{36}", ("npm_",), None),
    ("digitalocean-token", "api_key", r"(?<![A-Za-z0-9])do[opr]_v1_[a-f0-9]{64}", ("_v1_",), None),
    ("databricks-token", "api_key", r"(?<![A-Za-z0-9])dapi[a-f0-9]{32}", ("dapi",), None),
    # AWS keys come in pairs: a 40-character secret shortly after an access key id
    ("aws-secret-after-key-id", "api_key", r"(?:A3T[A-Z0-9]|AKIA|ASIA|ABIA|ACCA)[A-Z0-9]{16}[^\n]{0,60}?"
     r"(?<![A-Za-z0-9/+])([A-Za-z0-9/+]{40})(?![A-Za-z0-9/+=])", ("a3t", "akia", "asia", "abia", "acca"),
     random_looking),
    # an AWS secret access key alone: 40 characters of base64 with no padding
    ("aws-secret-shape", "api_key", r"[A-Za-z0-9/+](?<![A-Za-z0-9/+=][A-Za-z0-9/+])[A-Za-z0-9/+]{39}(?![A-Za-z0-9/+=])",
     (), _aws_secret),
    # a short key under its name: api_key=abcd1234efgh, "session_token": "…"
    ("named-key-assignment", "api_key",
     r"(?i)(?<![A-Za-z])(?:api[_-]?key|apikey|access[_-]?key|secret(?:[_-]?key)?|client[_-]?secret"
     r"|(?:auth|access|refresh|session|csrf|bearer|api|id)[_-]?token|token)[\"']?\s*[:=]\s*[\"']?"
     r"([A-Za-z0-9_\-+/=.~]{8,})", ("key", "secret", "token"), _not_a_word_or_number),
    # a generated-looking value under a name with a key-like word anywhere in it (nextPageToken,
    # x-api-key, DB_PASSWORD): the whole string is `name=value`, as the scan reads a JSON key with
    # its value, or as an environment line
    ("named-value", "api_key",
     r"(?i)\A[^\s=]*(?:key|secret|token|pass|pwd|auth|cred)[^\s=]*=([A-Za-z0-9_+/.~-]{16,}={0,2})\Z",
     ("key", "secret", "token", "pass", "pwd", "auth", "cred"), random_looking),
    # a high-entropy token shortly after a key-like word: AWS secret keys, generic API keys
    # (every 16+-character token is tried, and kept when a key-like word ends at most 40
    # characters before it: see _NEAR)
    ("keyword-high-entropy", "api_key", r"[A-Za-z0-9_+/.~-]{16,}={0,2}", ("key", "token", "secret", "credential"),
     random_looking),
    ("bearer-header", "bearer_token", r"(?i)\bbearer\s+([A-Za-z0-9\-._~+/]{12,}=*)", ("bearer",), _not_a_word),
    ("basic-auth-header", "bearer_token", r"(?i)\bbasic\s+([A-Za-z0-9+/]{12,}={0,2})", ("basic",), None),
    ("pem-private-key", "private_key", r"-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?-----(?:.*?-----END "
                                       r"(?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?-----|.*)", ("private key",), None),
    ("url-credentials", "password", r"\b[A-Za-z][A-Za-z0-9+.-]{1,20}://[^\s:/@\"'<>]*:([^\s/@\"'<>]+)@[^\s/@\"'<>]+",
     ("://",), None),
    # "password" as a word or the end of a name (POSTGRES_PASSWORD, db.password, --password)
    ("password-assignment", "password",
     r"(?i)(?<![A-Za-z])(?:password|passwd|passphrase|passcode|pass|pwd|pw|pin)(?![A-Za-z])[\"']?\s*"
     r"(?:[:=]|:=|=>|->)\s*[\"'`]?([^\s\"'`]{3,})", ("pass", "pwd", "pw", "pin"), _password),
    ("password-in-prose", "password",
     r"(?i)(?<![A-Za-z])(?:password|passwd|passphrase|passcode|pwd|pw)(?![A-Za-z])(?:\s+(?:for|of|on|to)\s+"
     r"(?:the\s+)?[\w.@/:-]+(?:\s+[\w.@/:-]+){0,3}?)?\s+(?:is|was|reads|=|to|set to|changed to|now)\s+"
     r"[\"'`]?([^\s\"'`]{3,})", ("pass", "pwd", "pw"), _prose_password),
    ("mysql-password-flag", "password", r"\bmysql(?:dump|admin|sh)?\b[^\n]*?\s-p[\"']?([^\s\"']{3,})", ("mysql",),
     _password),
    ("password-quoted", "password",
     r"(?i)\b(?:password|passwd|passphrase|passcode|pwd)\b[^\n\"'`]{0,40}[\"'`]([^\"'`\n]{3,64})[\"'`]",
     ("pass", "pwd"), _password),
    # personal data
    # (not an ssh remote: git@github.com:acme/billing.git)
    ("email", "email", r"\b[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b(?!:[\w/])", ("@",),
     None),
    ("phone-international", "phone",
     r"(?:\+(?<![\w+]\+)(?<!\d[ .-]\+)|00(?<![\w+]00)(?<!\d[ .-]00))[1-9][0-9]{0,3}(?:[ .\-/]?\(?[0-9]{1,5}\)?){2,6}"
     r"(?![\w])", ("+", "00"), _phone),
    ("phone-north-american", "phone",
     r"(?:\((?<![\w+]\()\d{3}\)[ .-]?\d{3}[ .-]\d{4}|\d(?<![\w+]\d)\d{2}[.-]\d{3}[.-]\d{4})(?!\w)",
     ("(", "-", "."), None),
    ("card-number", "credit_card", r"\d(?<![\w.-]\d)(?:[ -]?\d){12,18}(?![\w-])", (), _luhn_card),
    ("iban", "iban", r"[A-Z](?<!\w[A-Z])[A-Z]\d{2}(?: ?[A-Z0-9]{4}){2,7}(?: ?[A-Z0-9]{1,3})?\b", (), _iban),
    ("us-ssn", "ssn", r"\d(?<![\w-]\d)\d{2}-\d{2}-\d{4}(?![\w-])", ("-",), _ssn),
    # labelled, nine digits are taken as they are: even a number never issued (219-09-9999, on
    # sample cards) is what the field holds
    ("us-ssn-labelled", "ssn", r"(?i)(?<![A-Za-z])(?:ssn|social security(?: number)?)\D{0,20}(\d{9})(?!\d)",
     ("ssn", "social security"), None),
    # a marked note is redacted with what it marks: the rest of its line
    ("private-note", "private_note",
     r"(?:(?i:\[(?:private|confidential|internal only)\]|\bprivate note\s*[:\-\u2013]|\bnote \(private\)\s*:"
     r"|#private(?![\w-]))|(?m:^\s*(?:Private|Confidential)\s*:\s)|\b(?:PRIVATE|CONFIDENTIAL)\s*:)[^\n]*"
     r"|(?i:<private>.*?(?:</private>|$))", ("private", "confidential", "internal only"), None),
]


_NEAR = {"keyword-high-entropy": re.compile(rf"(?i)(?<![A-Za-z]){_KEY_WORDS}\b[^\n]{{0,40}}$")}


@cache
def all_rules() -> tuple[Rule, ...]:
    """Every rule, detect-secrets' first, in a fixed order (so findings are deterministic)."""
    own = [Rule(f"refinery:{rid}", kind, re.compile(rx, re.DOTALL), kw, valid, near=_NEAR.get(rid),
                numeric=rid in _NUMERIC) for rid, kind, rx, kw, valid in _OWN]
    return (*_detect_secrets_rules(), *own)


def ruleset() -> dict[str, str]:
    """Where the rules come from, by name and version: recorded in the export receipts."""
    from importlib.metadata import version

    own = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:12]
    return {"detect-secrets": _detect_secrets_data()["version"], "python-stdnum": version("python-stdnum"),
            "refinery": f"rules.py {own}"}


def main(argv: list[str]) -> int:
    """`--write`: regenerate detect_secrets_rules.json from the installed package; `--check`: compare."""
    want = json.dumps(read_detect_secrets(), indent=1, ensure_ascii=False) + "\n"
    if argv == ["--write"]:
        RULES_FILE.write_text(want, encoding="utf-8")
        return 0
    if argv == ["--check"]:
        if RULES_FILE.read_text(encoding="utf-8") != want:
            print(f"{RULES_FILE} does not match the installed detect-secrets; run "
                  "`python -m refinery.sensitive.rules --write`", file=sys.stderr)
            return 1
        return 0
    print("usage: python -m refinery.sensitive.rules --write | --check", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
